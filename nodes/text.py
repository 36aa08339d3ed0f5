"""Text-encoder glue: initializer tokens, concept prompts built from vectors, and a gradient-safe encode.

A concept prompt is the token list `embedding:NAME` produces: [start, v1, ..., vn, end, padding],
so the conditioning the nodes output equals what a plain CLIPTextEncode of `embedding:NAME` gives
once the vectors are saved.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import vct_ops
from . import host


@dataclasses.dataclass
class TextEncoder:
    """One text encoder of a CLIP object: its token key ('l'), its module and its embedding-file key."""

    clip: object
    key: str
    module: torch.nn.Module
    embedding_key: str

    @property
    def width(self) -> int:
        """Return the token-embedding width."""
        return self.module.transformer.get_input_embeddings().weight.shape[-1]


def text_encoder(clip, node: str) -> TextEncoder:
    """Return the single CLIP-L style text encoder of `clip`, or raise a ValueError naming what is connected."""
    outer = getattr(clip, "cond_stage_model", None)
    attr = getattr(outer, "clip", None)
    key = getattr(outer, "clip_name", None)
    inner = getattr(outer, attr, None) if isinstance(attr, str) else None
    tokenizer = getattr(getattr(clip, "tokenizer", None), attr, None) if isinstance(attr, str) else None
    if inner is None or key is None or not hasattr(inner, "process_tokens") or tokenizer is None:
        name = type(outer).__name__ if outer is not None else type(clip).__name__
        raise ValueError(
            f"{node}: the connected CLIP ({name}) is not a single SD1.x text encoder; connect the CLIP output of "
            "the same SD1.x CheckpointLoaderSimple as the model"
        )
    return TextEncoder(clip, key, inner, tokenizer.embedding_key)


def _special(encoder: TextEncoder) -> set[int]:
    return {int(t) for t in encoder.module.special_tokens.values() if t is not None}


def initializer_vectors(encoder: TextEncoder, word: str, count: int) -> torch.Tensor:
    """Return `count` starting vectors copied from the initializer's token embeddings (reference: i * len // n)."""
    if not word or not word.strip():
        raise ValueError("initializer is empty; give a word that describes the reference, e.g. 'girl' or 'painting'")
    tokens = encoder.clip.tokenize(word)[encoder.key]
    special = _special(encoder)
    ids = [int(t) for chunk in tokens for t, *_ in chunk if isinstance(t, int) and int(t) not in special]
    if not ids:
        raise ValueError(f"initializer {word!r} encodes to no word tokens; use a plain word such as 'girl'")
    table = encoder.module.transformer.get_input_embeddings().weight
    return vct_ops.init_concept_vectors(table[ids].detach().float().cpu(), count)


def concept_tokens(encoder: TextEncoder, vectors: torch.Tensor) -> list:
    """Return the token list of a prompt made only of the concept vectors, as `embedding:NAME` tokenizes it."""
    base = encoder.clip.tokenize("")[encoder.key][0]
    count = vectors.shape[0]
    if count > len(base) - 2:
        raise ValueError(f"{count} concept vectors do not fit in a {len(base)}-token prompt")
    return [base[0]] + [(vectors[i], 1.0) for i in range(count)] + list(base[1 : len(base) - count])


def encode_concept(encoder: TextEncoder, vectors: torch.Tensor) -> list:
    """Return the CONDITIONING of the concept prompt through ComfyUI's regular text-encoding path."""
    tokens = {encoder.key: [concept_tokens(encoder, vectors.detach().float().cpu())]}
    out = encoder.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    out["vct_concept_tokens"] = int(vectors.shape[0])
    return [[cond, out]]


class GradientEncoder:
    """Vectors -> conditioning with gradients to the vectors; mirrors SDClipModel.forward for one prompt."""

    def __init__(self, encoder: TextEncoder, device: torch.device) -> None:
        """Prepare the encoder (options as encode_from_tokens sets them; weights usable by autograd)."""
        self.encoder, self.device = encoder, device
        outer = encoder.clip.cond_stage_model
        outer.reset_clip_options()
        if getattr(encoder.clip, "layer_idx", None) is not None:
            outer.set_clip_options({"layer": encoder.clip.layer_idx})
        host.make_autograd_safe(encoder.module)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return the [1, tokens, width] conditioning of the concept prompt made of `vectors`."""
        module = self.encoder.module
        text_device = module.transformer.get_input_embeddings().weight.device
        tokens = [pair[0] for pair in concept_tokens(self.encoder, vectors.to(text_device))]  # weights are all 1
        embeds, mask, _, _ = module.process_tokens([tokens], text_device)
        if module.layer == "all":
            raise ValueError("concept learning needs a CLIP set to one layer, not 'all'")
        last, intermediate = clip_forward(
            module.transformer.text_model, embeds, mask if module.enable_attention_masks else None,
            None if module.layer == "last" else module.layer_idx, module.layer_norm_hidden_state,
        )
        z = last if module.layer == "last" else intermediate
        if module.zero_out_masked:
            z = z * mask.unsqueeze(-1).float()
        return z.float().to(self.device)


def clip_forward(text_model, embeds: torch.Tensor, attention_mask, layer_index, norm_intermediate: bool):
    """Return (last hidden state, hidden state after layer `layer_index`) of a ComfyUI CLIP text model.

    The same computation as `comfy.clip_model.CLIPTextModel_.forward`, written without its
    in-place residual additions, which break autograd when gradients flow to the embeddings.
    """
    x = embeds.float() + text_model.embeddings.position_embedding.weight.to(device=embeds.device, dtype=torch.float32)
    length = x.shape[1]
    mask = torch.full((length, length), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu(1)
    if attention_mask is not None:
        padding = 1.0 - attention_mask.to(x.dtype).reshape(attention_mask.shape[0], 1, 1, length)
        mask = mask + padding.masked_fill(padding.to(torch.bool), -torch.finfo(x.dtype).max)
    layers = text_model.encoder.layers
    if layer_index is not None and layer_index < 0:
        layer_index = len(layers) + layer_index
    intermediate = None
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (proj(h) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k, v = (t.view(t.shape[0], length, attn.heads, -1).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.out_proj(o.transpose(1, 2).reshape(x.shape[0], length, -1))
        x = x + layer.mlp(layer.layer_norm2(x))
        if i == layer_index:
            intermediate = x
    last = text_model.final_layer_norm(x)
    if intermediate is not None and norm_intermediate:
        intermediate = text_model.final_layer_norm(intermediate)
    return last, intermediate
