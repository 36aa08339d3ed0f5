"""VCT Dual-Branch Sampler: content-concept fusion, B borrowing B*'s attention."""
from __future__ import annotations

import logging

import latent_preview
import torch
from comfy_api.latest import io

from .. import vct_ops
from . import arch, progress, tokens
from .arch.mmdit import BLOCK_CHOICES as JOINT_BLOCK_CHOICES
from .model import denoiser, guidance, identity
from .model.conditioning import BranchConditioning, latent_out
from .model.controls import controls_ready
from .payloads import Inversion

log = logging.getLogger("ComfyUI-VCT")
NODE = "VCT Dual-Branch Sampler"


class VCTDualBranchSampler(io.ComfyNode):
    """Samples the reconstruction branch B* and the translation branch B together, B borrowing B*'s attention."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Return the node's schema."""
        return io.Schema(
            node_id="VCTDualBranchSampler",
            display_name="VCT Dual-Branch Sampler",
            category="VCT",
            description="Runs both VCT branches from the inverted noise: B* rebuilds the source, B follows the "
            "concept while borrowing B*'s self-attention (structure) and, early on, its cross-attention maps.",
            inputs=[
                io.Model.Input("model", tooltip="The same model (and LoRAs) used for the inversion."),
                Inversion.Input("inversion", tooltip="From VCT Content Null-Text Invert (it must carry null "
                                "embeddings). For Flux, which runs no CFG, VCT DDIM Invert's output directly."),
                io.Conditioning.Input("concept", tooltip="The concept prompt: from VCT Concept Embedding Learn, "
                                      "from VCT Concept Prompt (the concept inside a sentence), or a CLIPTextEncode "
                                      "of exactly 'embedding:my_concept' (then set concept_tokens)."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="CFG scale; use the one the null-text inversion was tuned for (7.5). Flux "
                               "runs no CFG and ignores it: its guidance comes from the prompt (FluxGuidance)."),
                io.Float.Input("self_injection", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps in which B uses B*'s self-attention maps. Higher "
                               "keeps more of the source's structure."),
                io.Float.Input("cross_injection", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps in which B takes B*'s cross-attention maps at the "
                               "aligned tokens."),
                io.Float.Input("concept_weight", default=0.5, min=0.0, max=5.0, step=0.05,
                               tooltip="Scale of the concept tokens' cross-attention during cross_injection."),
                io.Int.Input("concept_tokens", default=0, min=0, max=75, optional=True,
                             tooltip="0: read where the concept tokens are from the concept conditioning (VCT "
                             "Concept Embedding Learn and VCT Concept Prompt record it). For a CLIPTextEncode of "
                             "exactly embedding:NAME, the number of vectors in that embedding; the source prompt "
                             "must then be empty."),
                io.Combo.Input("equalizer", options=list(tokens.EQUALIZERS), default="concept_tokens", optional=True,
                               tooltip="Which tokens concept_weight scales. concept_tokens: the concept's own "
                               "tokens. reference_code: the positions the published code scales (the start "
                               "token and all but the last concept token)."),
                Inversion.Input("reference", optional=True,
                                tooltip="Optional, for appearance attention: the reference image's inversion from "
                                "VCT DDIM Invert (same model, same steps, same image size; its own prompt, e.g. "
                                "empty). Used only when appearance_strength is above 0."),
                io.Float.Input("appearance_strength", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="How much B's self-attention in the decoder reads the reference's keys and "
                               "values (its texture and colours) instead of what it gets otherwise. 0: off, the "
                               "paper's VCT. Needs a reference."),
                io.Float.Input("appearance_window", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of the steps, from the first, in which appearance attention acts."),
                io.Float.Input("local_blend", default=0.3, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Keeps the source's background: after the first 20% of the steps, the "
                               "translation takes the reconstruction's latent wherever the concept tokens' "
                               "attention is below this fraction of its peak (prompt-to-prompt's local blend, "
                               "0.3). 0: off, the paper's VCT. Higher confines the change to a smaller region."),
                io.Combo.Input("joint_blocks", options=list(JOINT_BLOCK_CHOICES), default="auto", optional=True,
                               tooltip="SD3 and Flux only: which joint-attention blocks take B*'s attention. auto: "
                               "the second half (measured best on a toy SD3 model). all: every block. first_half "
                               "/ second_half: the blocks in the first or second half of the network. vital: the "
                               "nine blocks Stable Flow found to matter in Flux.1 (FLUX.1 dev's layout only). "
                               "SD1.x, SD2.x and SDXL use every block (leave auto)."),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="translation",
                                 tooltip="The translated image B; decode with VAEDecode."),
                io.Latent.Output("reconstruction", display_name="reconstruction B*",
                                 tooltip="The reconstruction B* (should match the source); decode with VAEDecode."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, concept, cfg, self_injection, cross_injection, concept_weight,
                concept_tokens=0, equalizer="concept_tokens", reference=None, appearance_strength=0.0,
                appearance_window=1.0, local_blend=0.3, joint_blocks="auto") -> io.NodeOutput:
        """Sample both branches and return B and B*."""
        architecture = arch.for_model(model, NODE)
        identity.check_matches_model(inversion, model, NODE)
        appearance = _appearance(model, inversion, reference, appearance_strength, appearance_window)
        distilled = architecture.guidance_distilled(model)
        if inversion.null_embeddings is None and not distilled:
            raise ValueError(
                f"{NODE}: the inversion has no null embeddings; put VCT Content Null-Text Invert between "
                "VCT DDIM Invert and this node"
            )
        shape = inversion.source_latent.shape
        branch = BranchConditioning.read(model, concept, "concept", shape)
        source = inversion.source_cond
        source_tokens = source["c_crossattn"].shape[1]
        longer = "concept prompt" if branch.tokens > source_tokens else "source prompt (given to VCT DDIM Invert)"
        tokens.check_same_length(branch.tokens, source_tokens, "concept", "the source prompt",
                                 f"use a {longer} of at most 75 tokens")
        if concept_tokens > 0 and not branch.layout and not architecture.paper_layout:
            raise ValueError(
                f"{NODE}: concept_tokens assumes a CLIP prompt of exactly embedding:NAME, which "
                f"{arch.family_name(model)} does not encode that way (T5 has no start token). Encode the concept "
                "with VCT Concept Prompt, or connect VCT Concept Embedding Learn's conditioning, and set "
                "concept_tokens to 0"
            )
        config = tokens.injection_config(source["c_crossattn"], concept, self_injection, cross_injection,
                                         concept_weight, concept_tokens, equalizer, inversion.source_layout, NODE)
        blend = _local_blend(local_blend, config)
        try:
            patched = architecture.inject(model, config, inversion.sigmas, appearance, blocks=joint_blocks)
        except ValueError as error:
            raise ValueError(f"{NODE}: {error}") from None
        # Each branch's ControlNet: the concept's acts on B, the source's (kept by the inversion) on B*.
        controls = {vct_ops.ROLE_MAIN: branch.control, vct_ops.ROLE_REF: inversion.source_control}
        device = patched.load_device
        steps = inversion.steps
        preview = latent_preview.prepare_callback(patched, steps)

        def on_preview(step: int, total: int, denoised: torch.Tensor) -> None:
            # Like ComfyUI's samplers: the preview shows the current clean-latent estimate.
            preview(step - 1, denoised, denoised, total)

        method = inversion.traits
        if distilled:
            # One conditional pass per branch and step, guidance from the conditioning (FluxGuidance).
            # Straight from VCT DDIM Invert, B* is plain Euler sampling of the inverted noise (so a
            # concept equal to the source gives B = B*); with `direct`, B* is put back on the path.
            nulls, correct = None, method.corrects_reconstruction
        else:
            if abs(cfg - inversion.cfg) > 1e-6 and method.tuned_for_cfg:
                log.warning("%s: the null embeddings were tuned for cfg %.2f but cfg is %.2f; the reconstruction "
                            "will drift", NODE, inversion.cfg, cfg)
            nulls, correct = inversion.null_list(), method.corrects_reconstruction
        with controls_ready(patched, controls.values()) as control_models:
            denoiser.load(patched, control_models)
            # As ComfyUI's samplers do around sampling: the model knows its patcher (CFG hooks that
            # call the model again need it) and pre-run callbacks of other packs run.
            patched.pre_run()
            try:
                result = vct_ops.dual_branch_sample(
                    denoiser.Denoiser(patched, controls=controls),
                    inversion.trajectory[-1].to(device), inversion.sigmas.to(device),
                    source, branch.model_cond, nulls, guidance=cfg,
                    callback=progress.step_callback(progress.Progress(steps)), preview=on_preview,
                    ref_trajectory=inversion.trajectory.to(device) if correct else None,
                    guide_main=None if distilled else guidance.cfg_hooks(patched, branch, nulls, shape, device),
                    local_blend=blend,
                    **_reference_rows(reference if appearance is not None else None, device),
                )
            finally:
                patched.cleanup()
        if blend is not None and blend.enabled and result.blend_mask is None:
            log.warning("%s: local_blend found no cross-attention layer whose maps could outline the concept "
                        "(about 1/%d of the latent's side, at least %d positions) in this model, so the "
                        "background was not kept; set local_blend to 0 to run without it", NODE, blend.map_factor,
                        blend.min_map_positions)
        end, space = inversion.sigmas[-1], identity.state_space(model)
        return io.NodeOutput(
            latent_out(patched, space.to_latent(result.main, end)),
            latent_out(patched, space.to_latent(result.ref, end)),
        )


def _appearance(model, inversion, reference, strength, window):
    """Return the appearance-attention settings, None when off (strength 0), or raise naming the input to fix."""
    try:
        config = vct_ops.AppearanceConfig(strength=float(strength), end_fraction=float(window))
    except ValueError as error:
        raise ValueError(f"{NODE}: {error}") from None
    if not config.enabled:
        return None
    if reference is None:
        raise ValueError(f"{NODE}: appearance_strength is {strength} but no reference is connected; connect the "
                         "reference image's VCT DDIM Invert to 'reference', or set appearance_strength to 0")
    identity.check_reference(reference, inversion, model, NODE)
    length = inversion.source_cond["c_crossattn"].shape[1]
    tokens.check_same_length(reference.source_cond["c_crossattn"].shape[1], length, "the reference's prompt",
                             "the source prompt", "invert both images with the same prompt")
    return config


def _local_blend(threshold, config):
    """Return the local-blend settings on the concept tokens (None when off), or raise naming the input to fix."""
    if threshold == 0:
        return None
    # A concept whose every token aligns with the source prompt's (no words of its own) has no maps
    # to outline: the blend has nothing to keep apart, and B follows the refine alone.
    try:
        return vct_ops.BlendConfig(threshold=float(threshold), positions=config.concept_positions)
    except ValueError as error:
        raise ValueError(f"{NODE}: {error}; set local_blend between 0 (off) and 1") from None


def _reference_rows(reference, device) -> dict:
    """Return the sampler's reference arguments: R's trajectory and its own conditioning (none without R)."""
    if reference is None:
        return {}
    cond = {key: value.to(device) for key, value in reference.source_cond.items()}
    return {"appearance_trajectory": reference.trajectory.to(device), "appearance_cond": cond}
