"""VCT Concept Embedding Learn: multi-vector textual inversion of the reference image."""
from __future__ import annotations

import contextlib
import logging

import torch
from comfy_api.latest import io

from .. import vct_ops
from . import compat, host, inputs, storage, text
from .invert import frozen
from .payloads import Concept, ConceptData
from .plots import loss_curve

log = logging.getLogger("ComfyUI-VCT")
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def latent_sampler(latents: torch.Tensor):
    """Return a kernel latent sampler that picks one reference image and mirrors it with probability 0.5."""

    def sample(generator: torch.Generator) -> torch.Tensor:
        index = int(torch.randint(0, latents.shape[0], (1,), generator=generator))
        latent = latents[index : index + 1]
        # The reference flips the image before encoding; a LATENT input has no image, so the latent
        # is mirrored instead (the VAE is close to flip-equivariant).
        return latent.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else latent

    return sample


class VCTConceptLearn(io.ComfyNode):
    """Learns a few token vectors that stand for the reference image's object or style."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Return the node's schema."""
        return io.Schema(
            node_id="VCTConceptLearn",
            display_name="VCT Concept Embedding Learn",
            category="VCT",
            description="Textual inversion of the reference image into num_vectors new token vectors (only they "
            "train; the model and text encoder stay frozen). Optionally saves them as an embedding usable as "
            "embedding:NAME in any prompt.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x, SD2.x or SDXL model (with any LoRAs) the concept is "
                               "learned for."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Latent.Input("latent", tooltip="The reference image(s) encoded with VAEEncode (512x512 like the "
                                "paper works best). Several images in a batch are sampled at random."),
                io.String.Input("initializer", default="object", tooltip="A word close to the concept, e.g. 'girl', "
                                "'dog' or 'painting'; the vectors start from its token embeddings."),
                io.Int.Input("num_vectors", default=3, min=1, max=16, tooltip="How many token vectors stand for "
                             "the concept (3 in the paper)."),
                io.Int.Input("steps", default=500, min=1, max=10000, tooltip="Optimisation steps (500 in the paper; "
                             "100-1000 is the useful range). Each step is grad_accum model passes."),
                io.Float.Input("learning_rate", default=5e-4, min=1e-6, max=1.0, step=1e-5, round=False,
                               tooltip="Base learning rate; it is multiplied by grad_accum, as in the reference "
                               "code (5e-4 x 4 = 2e-3)."),
                io.Int.Input("grad_accum", default=4, min=1, max=64, tooltip="Model passes accumulated per step, "
                             "each with its own timestep and noise (4 in the reference)."),
                io.Float.Input("l1_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the L1 loss on the predicted clean latent (1 in the reference)."),
                # No control-after-generate widget: the frontend's would default to "randomize" (a
                # string here only renames it), and a new seed per Run would repeat the whole learning.
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed for timesteps, noise and flips; the same seed repeats a run on the "
                             "same device."),
                io.String.Input("embedding_name", default="", tooltip="When set, saves the vectors as "
                                "models/embeddings/<name>.safetensors, usable as embedding:<name>."),
                io.Boolean.Input("overwrite", default=False, tooltip="Allow replacing an existing embedding file "
                                 "of that name."),
            ],
            outputs=[
                io.Conditioning.Output("conditioning", display_name="conditioning",
                                       tooltip="The concept prompt, for VCT Dual-Branch Sampler."),
                Concept.Output("concept", display_name="concept",
                               tooltip="The learned vectors and their loss history."),
                io.Image.Output("loss", display_name="loss plot",
                                tooltip="Training loss per step (log scale); connect a PreviewImage."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, latent, initializer, num_vectors, steps, learning_rate, grad_accum, l1_weight,
                seed, embedding_name, overwrite) -> io.NodeOutput:
        """Learn the concept vectors and return the concept conditioning, the vectors and a loss plot."""
        node = "VCT Concept Embedding Learn"
        host.check_family(model, node)
        encoders = text.text_encoders(clip, node)
        width = inputs.context_width(model)
        if width is not None and sum(e.width for e in encoders) != width:
            raise ValueError(
                f"{node}: the CLIP encodes {sum(e.width for e in encoders)}-wide conditioning but the model takes "
                f"{width}; connect the CLIP of the same checkpoint as the model"
            )
        if embedding_name.strip() in SEED_CONTROL_VALUES:
            # Workflows saved before the seed lost its control widget hold that widget's value here.
            raise ValueError(
                f"{node}: embedding_name is {embedding_name!r}, a seed-control value from a workflow saved with an "
                "older version of this node; clear embedding_name (and check overwrite) and queue again"
            )
        if embedding_name.strip():
            storage.check_name(embedding_name, "embedding_name")
        init = {e.key: text.initializer_vectors(e, initializer, num_vectors) for e in encoders}
        references = inputs.latent_in(model, latent, "latent")
        device = model.load_device
        # One pass over all accumulated samples when memory allows (same gradient, faster); when
        # not even one sample fits, activations are recomputed in backward instead of kept.
        fuse = host.training_fits(model, (grad_accum, *references.shape[1:]))
        model = host.training_model(model, (1, *references.shape[1:]))
        with host.training_mode():
            model, clip = host.load_for_training(model, clip)
            config = vct_ops.ConceptConfig(
                steps=steps, learning_rate=learning_rate, grad_accum=grad_accum, l1_weight=l1_weight, seed=seed,
                prediction=host.prediction_type(model), fuse_accumulation=fuse,
            )
            modules = [model.model.diffusion_model] + [e.module for e in encoders]
            host.make_autograd_safe(model.model.diffusion_model, device)
            for e in encoders:
                host.make_autograd_safe(e.module, compat.text_device(clip))
            with contextlib.ExitStack() as stack:
                for module in modules:
                    stack.enter_context(frozen(module))
                result = vct_ops.learn_concept(
                    host.Denoiser(model, gradients=True),
                    text.GradientEncoder(encoders, model, references.shape, device),
                    # Clones: tensors made under inference mode upstream cannot be saved for backward.
                    {key: value.clone().to(device) for key, value in init.items()},
                    latent_sampler(references.clone().to(device)),
                    host.train_sigmas(model).clone().to(device),
                    config,
                    progress=host.Progress(steps),
                )
        vectors = {key: value.detach().float().cpu() for key, value in result.vectors.items()}
        files = {e.embedding_key: vectors[e.key] for e in encoders}
        if embedding_name.strip():
            path = storage.save_embedding(embedding_name, files, overwrite)
            log.info("saved concept embedding to %s", path)
        conditioning = text.encode_concept(encoders, vectors)
        plot = loss_curve(result.losses, "concept loss per step")
        return io.NodeOutput(conditioning, ConceptData(files, initializer, result.losses), plot)
