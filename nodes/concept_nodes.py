"""VCT Concept Embedding Learn and VCT Concept Prompt: the reference's concept as token vectors, and prompts
with it."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from .. import vct_ops
from . import arch, progress, prompts, storage
from .model import identity, training
from .model.conditioning import differentiable_model_cond, latent_in
from .payloads import Concept, ConceptData
from .plots import loss_curve

log = logging.getLogger("ComfyUI-VCT")
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


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
                io.Model.Input("model", tooltip="The SD1.x, SD2.x, SDXL, SD3.x or Flux.1 model (with any LoRAs) the "
                               "concept is learned for."),
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
        architecture = arch.for_model(model, node)
        encoders = architecture.text_encoders(clip, node)
        architecture.check_text_encoders(model, encoders, node)
        if embedding_name.strip() in SEED_CONTROL_VALUES:
            # Workflows saved before the seed lost its control widget hold that widget's value here.
            raise ValueError(
                f"{node}: embedding_name is {embedding_name!r}, a seed-control value from a workflow saved with an "
                "older version of this node; clear embedding_name (and check overwrite) and queue again"
            )
        if embedding_name.strip():
            storage.check_name(embedding_name, "embedding_name")
        init = {e.key: architecture.initializer_vectors(e, initializer, num_vectors) for e in encoders}
        references = latent_in(model, latent, "latent")
        device = model.load_device
        # One pass over all accumulated samples when memory allows (same gradient, faster); when
        # not even one sample fits, activations are recomputed in backward instead of kept.
        fuse = training.training_fits(model, (grad_accum, *references.shape[1:]))
        text_modules = tuple(e.module for e in encoders)
        with training.training_session(model, (1, *references.shape[1:]), clip, text_modules) as session:
            config = vct_ops.ConceptConfig(
                steps=steps, learning_rate=learning_rate, grad_accum=grad_accum, l1_weight=l1_weight, seed=seed,
                prediction=identity.prediction_type(session.model), fuse_accumulation=fuse,
            )
            to_model = differentiable_model_cond(session.model, "concept", references.shape, device)
            result = vct_ops.learn_concept(
                session.denoiser(),
                architecture.gradient_encoder(encoders, to_model),
                # Clones: tensors made under inference mode upstream cannot be saved for backward.
                {key: value.clone().to(device) for key, value in init.items()},
                vct_ops.reference_latent_sampler(references.clone().to(device)),
                identity.train_sigmas(session.model).clone().to(device),
                config,
                progress=progress.Progress(steps),
            )
        vectors = {key: value.detach().float().cpu() for key, value in result.vectors.items()}
        files = {e.embedding_key: vectors[e.key] for e in encoders}
        if embedding_name.strip():
            path = storage.save_embedding(embedding_name, files, overwrite)
            log.info("saved concept embedding to %s", path)
        conditioning = prompts.encode_concept(encoders, vectors)
        plot = loss_curve(result.losses, "concept loss per step")
        return io.NodeOutput(conditioning, ConceptData(files, initializer, result.losses), plot)


class VCTConceptPrompt(io.ComfyNode):
    """Encodes text with the learned concept vectors at {concept}, recording where every token is."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Return the node's schema."""
        return io.Schema(
            node_id="VCTConceptPrompt",
            display_name="VCT Concept Prompt",
            category="VCT",
            description="Encodes a prompt such as 'a photo of {concept}, oil painting' with the learned concept "
            "vectors in place of {concept}. The conditioning records its token layout, so the Dual-Branch "
            "Sampler aligns its attention maps with the source prompt's. Without a concept it encodes plain "
            "text the same way: use it for a non-empty source prompt before VCT DDIM Invert.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint the concept was learned with."),
                io.String.Input("text", default=f"a photo of {prompts.PLACEHOLDER}", multiline=True,
                                tooltip=f"The prompt; {prompts.PLACEHOLDER} marks where the concept goes (once). "
                                "ComfyUI's (word:1.2) weights and embedding:NAME work as in CLIPTextEncode."),
                Concept.Input("concept", optional=True,
                              tooltip="From VCT Concept Embedding Learn. Leave it unconnected to encode plain text "
                              f"(with no {prompts.PLACEHOLDER})."),
            ],
            outputs=[io.Conditioning.Output("conditioning", display_name="conditioning",
                                            tooltip="The prompt, for VCT Dual-Branch Sampler (concept) or VCT DDIM "
                                            "Invert (source).")],
        )

    @classmethod
    def execute(cls, clip, text: str, concept: ConceptData | None = None) -> io.NodeOutput:
        """Encode the prompt and record its token layout."""
        node = "VCT Concept Prompt"
        encoders = arch.text_encoders_of(clip, node)
        vectors = None
        if concept is not None:
            if not isinstance(concept, ConceptData):
                raise ValueError(f"{node}: 'concept' must come from VCT Concept Embedding Learn")
            vectors = {}
            for e in encoders:
                found = concept.vectors.get(e.embedding_key)
                if found is None or found.shape[-1] != e.width:
                    raise ValueError(
                        f"{node}: the concept was learned for another text encoder (it has "
                        f"{', '.join(sorted(concept.vectors))}); connect the CLIP of the checkpoint it was learned with"
                    )
                vectors[e.key] = found.to(torch.float32)
        return io.NodeOutput(prompts.encode_prompt(encoders, text, vectors))
