"""VCT Concept Prompt: a text prompt with the learned concept in it, whose token layout the sampler knows."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from . import text as vct_text
from .payloads import Concept, ConceptData


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
                io.String.Input("text", default=f"a photo of {vct_text.PLACEHOLDER}", multiline=True,
                                tooltip=f"The prompt; {vct_text.PLACEHOLDER} marks where the concept goes (once). "
                                "ComfyUI's (word:1.2) weights and embedding:NAME work as in CLIPTextEncode."),
                Concept.Input("concept", optional=True,
                              tooltip="From VCT Concept Embedding Learn. Leave it unconnected to encode plain text "
                              f"(with no {vct_text.PLACEHOLDER})."),
            ],
            outputs=[io.Conditioning.Output("conditioning", display_name="conditioning",
                                            tooltip="The prompt, for VCT Dual-Branch Sampler (concept) or VCT DDIM "
                                            "Invert (source).")],
        )

    @classmethod
    def execute(cls, clip, text: str, concept: ConceptData | None = None) -> io.NodeOutput:
        """Encode the prompt and record its token layout."""
        node = "VCT Concept Prompt"
        encoders = vct_text.text_encoders(clip, node)
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
        return io.NodeOutput(vct_text.encode_prompt(encoders, text, vectors))

