"""VCT DDIM Invert and VCT Content Null-Text Invert."""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import comfy.model_management
import torch
from comfy_api.latest import io

from .. import vct_ops
from . import host, inputs, text
from .control import ALL_ROWS, controls_ready, make_controls_autograd_safe
from .payloads import Inversion, InversionData, stack_steps
from .plots import loss_curve

MAX_STEPS = 1000
log = logging.getLogger("ComfyUI-VCT")


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Switch off gradients for a module's parameters for the duration, restoring the flags by name after."""
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for name, p in module.named_parameters():
            if flags.get(name) and not p.is_inference():
                p.requires_grad_(True)


def check_matches_model(inversion: InversionData, model, node: str) -> None:
    """Raise ValueError when the inversion was made with another model (or other weight patches)."""
    if not isinstance(inversion, InversionData):
        raise ValueError(f"{node}: 'inversion' must come from VCT DDIM Invert or VCT Load Inversion")
    if inversion.model_fingerprint != host.model_fingerprint(model):
        raise ValueError(
            f"{node}: the {inversion.describe()} was made with another model (or the same model with other "
            "LoRAs/patches). Connect the model that made it, or run VCT DDIM Invert again with this one."
        )


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
                io.Model.Input("model", tooltip="The Stable Diffusion model (SD1.x, SD2.x or SDXL). LoRAs applied "
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
        family = host.check_family(model, node)
        vct_ops.validate.check_steps("steps", steps, low=1, high=MAX_STEPS)
        z0 = inputs.latent_in(model, latent, "latent")
        cond = inputs.model_cond(model, conditioning, "conditioning", z0.shape, allow=("control",))
        inputs.check_one_chunk(conditioning, f"{node}: conditioning (the source prompt)")
        # A ControlNet on the source prompt stays with the inversion: null-text inversion and B* in
        # the sampler run with it, so B* still rebuilds the source.
        control = conditioning[0][1].get("control")
        sigmas = vct_ops.ddim_sigmas(host.train_sigmas(model), steps)
        train_steps = host.train_sigmas(model).numel()
        if train_steps % steps:  # leading spacing, as the reference: the schedule tops out below t = 999 - ratio
            log.warning("%s: %d steps do not divide %d; the inversion stops at t = %d, short of the usual top",
                        node, steps, train_steps, (steps - 1) * (train_steps // steps))
        device = model.load_device
        progress = host.Progress(steps)
        with controls_ready(model, [control]) as control_models:
            host.load(model, control_models)
            trajectory = vct_ops.ddim_invert(
                host.Denoiser(model, sample_sigmas=sigmas.to(device), controls={ALL_ROWS: control}),
                vct_ops.latent_to_x(z0.to(device), sigmas[-1]), sigmas.to(device),
                cond, callback=host.step_callback(progress),
            )
        data = InversionData(
            trajectory=trajectory.to(comfy.model_management.intermediate_device()),
            sigmas=sigmas,
            source_cond=cond,
            source_latent=latent["samples"].detach().float().cpu(),
            model_fingerprint=host.model_fingerprint(model),
            family=family,
            source_layout=conditioning[0][1].get(text.LAYOUT_KEY),
            source_control=control,
        )
        return io.NodeOutput(data, inputs.latent_out(model, trajectory[-1]))


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
                io.Combo.Input("method", options=list(vct_ops.CONTENT_METHODS), default="null_text",
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
    def execute(cls, model, inversion, cfg, inner_steps, early_stop, method="null_text", negative=None
                ) -> io.NodeOutput:
        """Compute the null embeddings with the chosen method; return the extended inversion and a loss plot."""
        node = "VCT Content Null-Text Invert"
        host.check_family(model, node)
        check_matches_model(inversion, model, node)
        vct_ops.validate.check_steps("inner_steps", inner_steps, low=1, high=1000)
        init = inversion.source_cond
        if negative is not None:
            init = inputs.model_cond(model, negative, "negative", inversion.source_latent.shape, "negative")
            tokens, source_tokens = init["c_crossattn"].shape[1], inversion.source_cond["c_crossattn"].shape[1]
            if tokens != source_tokens:
                raise ValueError(
                    f"negative has {tokens} tokens but the source prompt has {source_tokens}; "
                    "use prompts of the same length"
                )
        if method not in vct_ops.CONTENT_METHODS:
            raise ValueError(f"method must be one of {', '.join(vct_ops.CONTENT_METHODS)}, got {method!r}")
        if method != "null_text":
            # No optimisation: negative_prompt uses the source prompt itself as the null embedding;
            # direct keeps the ordinary negative and corrects B* in the sampler instead.
            start = inversion.source_cond if method == "negative_prompt" else init
            result = vct_ops.fixed_null_embeddings(start, inversion.steps)
            tuned = dataclasses.replace(inversion, null_embeddings=stack_steps(result.embeddings), null_losses=[],
                                        null_iterations=result.iterations, method=method, cfg=cfg)
            return io.NodeOutput(tuned, loss_curve([], f"{method}: no optimisation"))
        device = model.load_device
        # Checkpointed when a one-row training pass would not fit (the cond row runs without grad).
        model = host.training_model(model, (1, *inversion.trajectory.shape[2:]))
        control = inversion.source_control
        with host.training_mode(), controls_ready(model, [control]) as control_models:
            model, _ = host.load_for_training(model, extra=tuple(control_models))
            unet = model.model.diffusion_model
            host.make_autograd_safe(unet, model.load_device)
            make_controls_autograd_safe(control, model.load_device)  # nothing without a control
            with frozen(unet):
                result = vct_ops.null_text_invert(
                    host.Denoiser(model, gradients=True, sample_sigmas=inversion.sigmas.clone().to(device),
                                  controls={ALL_ROWS: control}),
                    inversion.trajectory.clone().to(device),
                    inversion.sigmas.clone().to(device),
                    {key: value.clone().to(device) for key, value in inversion.source_cond.items()},
                    {key: value.clone().to(device) for key, value in init.items()},
                    guidance=cfg,
                    inner_steps=inner_steps,
                    early_stop=early_stop,
                    progress=host.Progress(inversion.steps * inner_steps),
                )
        tuned = dataclasses.replace(inversion, null_embeddings=stack_steps(result.embeddings),
                                    null_losses=result.losses, null_iterations=result.iterations, method="null_text",
                                    cfg=cfg)
        plot = loss_curve(result.losses, "null-text loss per step")
        return io.NodeOutput(tuned, plot)
