"""VCT DDIM Invert and VCT Content Null-Text Invert: the source's inversion and its null embeddings."""
from __future__ import annotations

import dataclasses
import logging

import comfy.model_management
from comfy_api.latest import io

from .. import vct_ops
from . import arch, progress, tokens
from .model import denoiser, identity, training
from .model.conditioning import BranchConditioning, latent_in, latent_out, model_cond
from .model.controls import ALL_ROWS, controls_ready
from .payloads import ContentMethod, Inversion, InversionData, stack_steps
from .plots import loss_curve

MAX_STEPS = 1000
log = logging.getLogger("ComfyUI-VCT")


class VCTDDIMInvert(io.ComfyNode):
    """Deterministic DDIM inversion of the source latent: the shared starting noise of both VCT branches."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Return the node's schema."""
        return io.Schema(
            node_id="VCTDDIMInvert",
            display_name="VCT DDIM Invert",
            category="VCT",
            description="Runs DDIM backwards from the encoded source image to noise, keeping the whole path. "
            "Its end is the noise both VCT branches start from. Guidance 1, like the paper.",
            inputs=[
                io.Model.Input("model", tooltip="The model (SD1.x, SD2.x, SDXL, SD3.x or Flux.1). LoRAs applied "
                               "before this node must stay the same for every VCT node."),
                io.Latent.Input("latent", tooltip="The source image encoded with VAEEncode: its structure is kept."),
                io.Conditioning.Input("conditioning", tooltip="The source prompt. The paper uses an empty prompt "
                                      "(CLIPTextEncode with no text); for a non-empty one use VCT Concept Prompt, "
                                      "so the sampler can align its words with the concept prompt's."),
                io.Int.Input("steps", default=50, min=1, max=MAX_STEPS, tooltip="DDIM steps (50 in the paper). "
                             "Every VCT node downstream uses the same schedule. Steps that do not divide 1000 "
                             "stop short of the usual top (400 steps at t = 798, 600 at t = 599), as in the "
                             "reference."),
            ],
            outputs=[
                Inversion.Output("inversion", display_name="inversion",
                                 tooltip="The inversion path; feed it to VCT Content Null-Text Invert."),
                io.Latent.Output("noise", display_name="noise",
                                 tooltip="The inverted noise z*_T as a sampler state at the schedule's first sigma "
                                 "(t = 980 for 50 steps), for samplers started at that sigma with add_noise disabled."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, conditioning, steps) -> io.NodeOutput:
        """Invert the source latent and return the inversion and its noise."""
        node = "VCT DDIM Invert"
        family = identity.check_family(model, node)
        vct_ops.validate.check_steps("steps", steps, low=1, high=MAX_STEPS)
        z0 = latent_in(model, latent, "latent")
        source = BranchConditioning.read(model, conditioning, "conditioning", z0.shape)
        arch.for_model(model, node).check_prompt_length(conditioning, f"{node}: conditioning (the source prompt)")
        train_sigmas = identity.train_sigmas(model)
        sigmas = vct_ops.ddim_sigmas(train_sigmas, steps)
        if train_sigmas.numel() % steps:  # leading spacing, as the reference: the schedule tops out below t = 999
            log.warning("%s: %d steps do not divide %d; the inversion stops at t = %d, short of the usual top",
                        node, steps, train_sigmas.numel(), (steps - 1) * (train_sigmas.numel() // steps))
        device = model.load_device
        space = identity.state_space(model)
        # A ControlNet on the source prompt stays with the inversion: null-text inversion and B* in
        # the sampler run with it, so B* still rebuilds the source.
        with controls_ready(model, [source.control]) as control_models:
            denoiser.load(model, control_models)
            trajectory = vct_ops.ddim_invert(
                denoiser.Denoiser(model, sample_sigmas=sigmas.to(device), controls={ALL_ROWS: source.control}),
                space.to_state(z0.to(device), sigmas[-1]), sigmas.to(device),
                source.model_cond, callback=progress.step_callback(progress.Progress(steps)), space=space,
            )
        data = InversionData(
            trajectory=trajectory.to(comfy.model_management.intermediate_device()),
            sigmas=sigmas,
            source_cond=source.model_cond,
            source_latent=latent["samples"].detach().float().cpu(),
            model_fingerprint=identity.model_fingerprint(model),
            family=family,
            source_layout=source.layout,
            source_control=source.control,
        )
        return io.NodeOutput(data, latent_out(model, trajectory[-1]))


class VCTNullTextInvert(io.ComfyNode):
    """Pivotal tuning: one null embedding per step so CFG sampling retraces the source exactly."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Return the node's schema."""
        return io.Schema(
            node_id="VCTNullTextInvert",
            display_name="VCT Content Null-Text Invert",
            category="VCT",
            description="Optimises one unconditional embedding per DDIM step (null-text inversion) so that "
            "sampling the inverted noise at the given CFG rebuilds the source. This is the slow step: "
            "up to steps x inner_steps model passes with gradients.",
            inputs=[
                io.Model.Input("model", tooltip="The same model (and LoRAs) given to VCT DDIM Invert."),
                Inversion.Input("inversion", tooltip="From VCT DDIM Invert (or VCT Load Inversion)."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="The CFG scale the dual-branch sampler will use (7.5 in the paper)."),
                io.Int.Input("inner_steps", default=50, min=1, max=1000,
                             tooltip="Most optimisation iterations per DDIM step (50 in the reference code)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=False,
                               tooltip="A step stops once its loss is below early_stop + step_index * 2e-5."),
                io.Combo.Input("method", options=[m.value for m in ContentMethod],
                               default=ContentMethod.NULL_TEXT.value,
                               tooltip="null_text: the paper's per-step optimisation (slow, exact at cfg). "
                               "negative_prompt: the source prompt as the null embedding (no optimisation). "
                               "direct: the sampler puts B* back on the inversion path every step (no "
                               "optimisation, exact B*)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Optional start for the null embeddings. Default: the source "
                                      "prompt's conditioning (the empty prompt in the paper)."),
            ],
            outputs=[
                Inversion.Output("tuned_inversion", display_name="inversion",
                                 tooltip="The inversion with its per-step null embeddings."),
                io.Image.Output("loss", display_name="loss plot",
                                tooltip="Final reconstruction loss of every step (log scale); connect a PreviewImage."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, cfg, inner_steps, early_stop, method=ContentMethod.NULL_TEXT.value,
                negative=None) -> io.NodeOutput:
        """Compute the null embeddings with the chosen method; return the extended inversion and a loss plot."""
        node = "VCT Content Null-Text Invert"
        architecture = arch.for_model(model, node)
        identity.check_matches_model(inversion, model, node)
        vct_ops.validate.check_steps("inner_steps", inner_steps, low=1, high=1000)
        method = _content_method(method)
        if architecture.guidance_distilled(model) and method is not ContentMethod.DIRECT:
            raise ValueError(
                f"{node}: this {arch.family_name(model)} model is guidance-distilled: it runs no unconditional branch, "
                f"so there are no null embeddings to tune. Set method to {ContentMethod.DIRECT.value}, or connect "
                "VCT DDIM Invert straight to VCT Dual-Branch Sampler"
            )
        init = inversion.source_cond
        if negative is not None:
            init = model_cond(model, negative, "negative", inversion.source_latent.shape, "negative")
            tokens.check_same_length(init["c_crossattn"].shape[1], inversion.source_cond["c_crossattn"].shape[1],
                                     "negative", "the source prompt", "use prompts of the same length")
        if not method.traits.optimises:
            # No optimisation: negative_prompt uses the source prompt itself as the null embedding;
            # direct keeps the ordinary negative and corrects B* in the sampler instead.
            start = inversion.source_cond if method.traits.nulls_from_source else init
            result = vct_ops.fixed_null_embeddings(start, inversion.steps)
            tuned = dataclasses.replace(inversion, null_embeddings=stack_steps(result.embeddings), null_losses=[],
                                        null_iterations=result.iterations, method=method, cfg=cfg)
            return io.NodeOutput(tuned, loss_curve([], f"{method.value}: no optimisation"))
        device = model.load_device
        # Checkpointed when a one-row training pass would not fit (the cond row runs without grad).
        sample_shape = (1, *inversion.trajectory.shape[2:])
        with training.training_session(model, sample_shape, control=inversion.source_control) as session:
            result = vct_ops.null_text_invert(
                session.denoiser(sample_sigmas=inversion.sigmas.clone().to(device)),
                inversion.trajectory.clone().to(device),
                inversion.sigmas.clone().to(device),
                {key: value.clone().to(device) for key, value in inversion.source_cond.items()},
                {key: value.clone().to(device) for key, value in init.items()},
                guidance=cfg,
                inner_steps=inner_steps,
                early_stop=early_stop,
                progress=progress.Progress(inversion.steps * inner_steps),
                space=identity.state_space(model),
            )
        tuned = dataclasses.replace(inversion, null_embeddings=stack_steps(result.embeddings),
                                    null_losses=result.losses, null_iterations=result.iterations, method=method,
                                    cfg=cfg)
        return io.NodeOutput(tuned, loss_curve(result.losses, "null-text loss per step"))


def _content_method(value) -> ContentMethod:
    """Return the method named by the node's input, or raise naming the valid ones."""
    try:
        return ContentMethod(value)
    except ValueError:
        names = ", ".join(m.value for m in ContentMethod)
        raise ValueError(f"method must be one of {names}, got {value!r}") from None
