"""VCT Dual-Branch Sampler: content-concept fusion with attention control."""
from __future__ import annotations

import logging
import uuid
from typing import Optional

import comfy.conds
import comfy.ldm.modules.attention as comfy_attention
import comfy.sampler_helpers
import comfy.samplers
import latent_preview
import torch
from comfy_api.latest import io

from .. import vct_ops
from . import host, inputs, text
from .control import controls_ready
from .invert import check_matches_model
from .payloads import Inversion

log = logging.getLogger("ComfyUI-VCT")


def _comfy_attention(q, k, v, heads, extra_options):
    # ComfyUI's fastest attention for this device, for every row VCT does not change; the
    # layer's precision (SD2.x asks for float32) is honoured as in ComfyUI's own layers.
    return comfy_attention.optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


EQUALIZERS = ("concept_tokens", "reference_code")
# The ends of every token layout, as symbols: layouts recorded by the pack carry the tokenizer's real
# start and end ids, the paper's layout (assumed) does not know them.
START, END = -(1 << 40), -(1 << 40) - 1  # below every other layout id


def equalizer_positions(layout: list, equalizer: str) -> list[int]:
    """Return the token positions the equaliser scales in a concept prompt's layout.

    `concept_tokens` scales the concept vectors' positions. `reference_code` reproduces the
    reference implementation, whose word-index helper drops the start token's +1 and so scales
    the position before each: with the paper's layout, the start token and all but the last
    concept token.
    """
    if equalizer not in EQUALIZERS:
        raise ValueError(f"equalizer must be one of {', '.join(EQUALIZERS)}, got {equalizer!r}")
    positions = [j for j, token in enumerate(layout) if text.is_concept_id(token)]
    return positions if equalizer == "concept_tokens" else [p - 1 for p in positions]


def paper_layout(count: int) -> list[int]:
    """Return the layout of a prompt made of `count` concept vectors alone: [start, c1..cn, end]."""
    return [START] + [text.concept_id(i) for i in range(count)] + [END]


def _ends_symbolic(layout: list) -> list:
    return [START] + [int(t) for t in layout[1:-1]] + [END]


def token_layouts(source: torch.Tensor, source_layout, concept: list, concept_tokens: int, node: str
                  ) -> tuple[list, list]:
    """Return the (source, concept) token layouts the refine mapping aligns, from what the inputs record.

    The concept's comes from its conditioning (VCT Concept Embedding Learn, VCT Concept Prompt) or
    from `concept_tokens` for a plain `embedding:NAME` prompt; the source's from the inversion (its
    conditioning came from VCT Concept Prompt) or, for the paper's empty prompt, from the concept's
    record of the same CLIP's empty-prompt encoding.
    """
    cond, options = concept[0][0], concept[0][1]
    if cond.shape[1:] == source.shape[1:] and torch.equal(cond.cpu().float(), source.cpu().float()):
        return [START, END], [START, END]  # the concept is the source prompt: every token aligns
    recorded = options.get(text.LAYOUT_KEY)
    if recorded:
        target = _ends_symbolic(recorded)
    elif concept_tokens > 0:
        target = paper_layout(concept_tokens)
    else:
        raise ValueError(
            f"{node}: the concept conditioning does not say where its concept tokens are. Connect it from VCT "
            "Concept Embedding Learn or VCT Concept Prompt, or, for a CLIPTextEncode of exactly embedding:NAME, set "
            "concept_tokens to the number of vectors in that embedding"
        )
    if source_layout:
        return _ends_symbolic(source_layout), target
    empty = options.get(text.EMPTY_PROMPT_KEY)
    if empty is None:
        # A plain embedding:NAME concept with concept_tokens set, and a source that records nothing:
        # the paper's layout is assumed and nothing can confirm it, so the user is told.
        log.warning("%s: neither prompt records its tokens, so the paper's layout is assumed: the concept "
                    "prompt is exactly embedding:NAME with concept_tokens = %d vectors, and the source prompt is "
                    "empty. Nothing can check that count: if NAME has another number of vectors, the equaliser and "
                    "the cross-attention alignment fall on the wrong tokens. For any other prompts, or to have the "
                    "count read instead of assumed, encode both with VCT Concept Prompt", node, concept_tokens)
        return [START, END], target
    if empty.shape[1:] == source.shape[1:] and torch.allclose(empty.float().cpu(), source.float().cpu(),
                                                              rtol=1e-3, atol=1e-3):
        return [START, END], target
    log.warning("%s: the source prompt is not empty and its tokens are unknown, so its cross-attention maps are "
                "aligned as if it were empty. Encode the source prompt with VCT Concept Prompt before VCT DDIM "
                "Invert to align it word by word", node)
    return [START, END], target


def injection_config(source: torch.Tensor, concept: list, self_fraction: float, cross_fraction: float,
                     concept_weight: float, concept_tokens: int, equalizer: str = "concept_tokens",
                     source_layout=None, node: str = "VCT Dual-Branch Sampler") -> vct_ops.InjectionConfig:
    """Return the injection settings: the refine mapping of the source prompt's tokens to the concept prompt's."""
    length = concept[0][0].shape[1]
    source_ids, target_ids = token_layouts(source, source_layout, concept, concept_tokens, node)
    mapper, alphas = vct_ops.refine_mapping(source_ids, target_ids, length)
    weights = vct_ops.token_weights(length, equalizer_positions(target_ids, equalizer), concept_weight)
    return vct_ops.InjectionConfig(self_fraction, cross_fraction, mapper, alphas, weights)


CFG_HOOKS = ("sampler_pre_cfg_function", "sampler_cfg_function", "sampler_post_cfg_function")


def cfg_hooks(model, concept: list, inversion, device) -> Optional[vct_ops.Guidance]:
    """Return B's guidance through the model's CFG hooks (RescaleCFG, PAG, ...), or None when it has none.

    The hooks get the arguments ComfyUI's own sampling gives them: B's cond and uncond denoised
    rows, its input and sigma, the model and its options, and B's conditionings in ComfyUI's
    sampler format (the concept; the step's null embedding as the negative). B* keeps plain CFG:
    its null embeddings were tuned so that plain CFG rebuilds the source, and B borrows its maps.
    """
    options = model.model_options
    if not any(options.get(key) for key in CFG_HOOKS):
        return None
    base = model.model
    shape = inversion.source_latent.shape
    positive = comfy.samplers.encode_model_conds(base.extra_conds, comfy.sampler_helpers.convert_cond(concept),
                                                 torch.zeros(shape), device, "positive")
    nulls = inversion.null_list()
    negative_uuid = uuid.uuid4()  # one negative across the steps, as in ComfyUI's sampling (caches key by it)

    def negative(step: int) -> list:
        null = nulls[step]
        model_conds = {"c_crossattn": comfy.conds.CONDCrossAttn(null["c_crossattn"].to(device))}
        if "y" in null:
            model_conds["y"] = comfy.conds.CONDRegular(null["y"].to(device))
        return [{"cross_attn": null["c_crossattn"], "model_conds": model_conds, "uuid": negative_uuid}]

    def guide(x, sigma, cond_pred, uncond_pred, scale, step):
        uncond = negative(step)
        conds, out = [positive, uncond], [cond_pred, uncond_pred]
        for fn in options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": sigma, "input": x,
                      "sigma": sigma, "model": base, "model_options": options})
        return comfy.samplers.cfg_function(base, out[0], out[1], scale, x, sigma, model_options=options,
                                           cond=positive, uncond=uncond)

    return guide


def patched_clone(model, controller: vct_ops.AttentionController):
    """Return a clone of `model` with the controller on every transformer block, wrapping patches already there."""
    clone = model.clone()
    for key in host.transformer_block_keys(clone):
        for kind in ("attn1", "attn2"):
            previous = host.existing_replace_patch(clone.model_options, kind, key)
            clone.set_model_patch_replace(controller.patch(kind, previous), kind, *key)
    return clone


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
                                "embeddings)."),
                io.Conditioning.Input("concept", tooltip="The concept prompt: from VCT Concept Embedding Learn, "
                                      "from VCT Concept Prompt (the concept inside a sentence), or a CLIPTextEncode "
                                      "of exactly 'embedding:my_concept' (then set concept_tokens)."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="CFG scale; use the one the null-text inversion was tuned for (7.5)."),
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
                io.Combo.Input("equalizer", options=list(EQUALIZERS), default="concept_tokens", optional=True,
                               tooltip="Which tokens concept_weight scales. concept_tokens: the concept's own "
                               "tokens. reference_code: the positions the published code scales (the start "
                               "token and all but the last concept token)."),
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
                concept_tokens=0, equalizer="concept_tokens") -> io.NodeOutput:
        """Sample both branches and return B and B*."""
        node = "VCT Dual-Branch Sampler"
        host.check_family(model, node)
        check_matches_model(inversion, model, node)
        if inversion.null_embeddings is None:
            raise ValueError(
                f"{node}: the inversion has no null embeddings; put VCT Content Null-Text Invert between "
                "VCT DDIM Invert and this node"
            )
        cond = inputs.model_cond(model, concept, "concept", inversion.source_latent.shape, allow=("control",))
        source = inversion.source_cond
        tokens, source_tokens = cond["c_crossattn"].shape[1], source["c_crossattn"].shape[1]
        if tokens != source_tokens:
            longer = "concept prompt" if tokens > source_tokens else "source prompt (given to VCT DDIM Invert)"
            raise ValueError(
                f"concept encodes to {tokens} tokens but the source prompt to {source_tokens}; use a {longer} "
                "of at most 75 tokens"
            )
        config = injection_config(source["c_crossattn"], concept, self_injection, cross_injection, concept_weight,
                                  concept_tokens, equalizer, inversion.source_layout, node)
        controller = vct_ops.AttentionController(inversion.sigmas, config, attention=_comfy_attention)
        patched = patched_clone(model, controller)
        # Each branch's ControlNet: the concept's acts on B, the source's (kept by the inversion) on B*.
        controls = {vct_ops.ROLE_MAIN: concept[0][1].get("control"), vct_ops.ROLE_REF: inversion.source_control}
        device = patched.load_device
        steps = inversion.steps
        preview = latent_preview.prepare_callback(patched, steps)
        progress = host.Progress(steps)

        def on_preview(step: int, total: int, denoised: torch.Tensor) -> None:
            # Like ComfyUI's samplers: the preview shows the current clean-latent estimate.
            preview(step - 1, denoised, denoised, total)

        if abs(cfg - inversion.cfg) > 1e-6 and inversion.method == "null_text":
            log.warning("%s: the null embeddings were tuned for cfg %.2f but cfg is %.2f; the reconstruction "
                        "will drift", node, inversion.cfg, cfg)
        with controls_ready(patched, controls.values()) as control_models:
            host.load(patched, control_models)
            # As ComfyUI's samplers do around sampling: the model knows its patcher (CFG hooks that
            # call the model again need it) and pre-run callbacks of other packs run.
            patched.pre_run()
            try:
                result = vct_ops.dual_branch_sample(
                    host.Denoiser(patched, controls=controls),
                    inversion.trajectory[-1].to(device), inversion.sigmas.to(device),
                    source, cond, inversion.null_list(), guidance=cfg,
                    callback=host.step_callback(progress), preview=on_preview,
                    ref_trajectory=inversion.trajectory.to(device) if inversion.method == "direct" else None,
                    guide_main=cfg_hooks(patched, concept, inversion, device),
                )
            finally:
                patched.cleanup()
        end = inversion.sigmas[-1]
        return io.NodeOutput(
            inputs.latent_out(patched, vct_ops.x_to_latent(result.main, end)),
            inputs.latent_out(patched, vct_ops.x_to_latent(result.ref, end)),
        )
