"""The CLIP text encoders of the Stable Diffusion families, driven the way concept learning needs them.

SD1.x has CLIP-L, SD2.x OpenCLIP-H, SDXL CLIP-L and CLIP-G side by side. Each is reached through
ComfyUI's CLIP object (its tokenizer and `cond_stage_model`); the forward with gradients is
written out here because ComfyUI's adds residuals in place, which autograd cannot go through.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ... import vct_ops
from ..prompts import spliced_tokens


@dataclasses.dataclass
class ClipEncoder:
    """One text encoder of a CLIP object: its token key ('l', 'h', 'g'), its module and its embedding-file key.

    `segment` names the span of the model's text tokens its output fills (encoders that share one
    sit side by side, as SDXL's CLIP-L and CLIP-G); None when only its pooled output reaches the
    model (Flux's CLIP-L).
    """

    clip: object
    key: str
    module: torch.nn.Module
    embedding_key: str
    segment: Optional[str] = "clip"
    start = True  # CLIP's token stream begins with a start token

    @property
    def width(self) -> int:
        """Return the token-embedding width."""
        return self.module.transformer.get_input_embeddings().weight.shape[-1]

    def splice(self, before: str, vectors, after: str, tokenized: dict | None = None) -> tuple[list, list]:
        """Return (token list, layout ids) of `before` + the concept vectors + `after` for this encoder."""
        return spliced_tokens(self, before, vectors, after, tokenized)

    def encode(self, vectors: torch.Tensor, tokenized: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (hidden states, pooled output) of the prompt made of `vectors` alone, with gradients to them."""
        module = self.module
        tokens = [pair[0] for pair in self.splice("", vectors.to(device), "", tokenized)[0]]  # weights 1
        embeds, mask, num_tokens, _ = module.process_tokens([tokens], device)
        if module.layer == "all":
            raise ValueError("concept learning needs a CLIP set to one layer, not 'all'")
        last, intermediate = clip_forward(
            module.transformer.text_model, embeds, mask if module.enable_attention_masks else None,
            None if module.layer == "last" else module.layer_idx, module.layer_norm_hidden_state,
        )
        z = last if module.layer == "last" else intermediate
        if module.zero_out_masked:
            z = z * mask.unsqueeze(-1).float()
        pooled = last[torch.arange(last.shape[0]), [n - 1 for n in num_tokens]]
        if module.return_projected_pooled:
            pooled = module.transformer.text_projection(pooled)
        return z.float(), pooled.float()


def clip_encoders(clip, node: str) -> list[ClipEncoder]:
    """Return the text encoders of `clip` (one, or CLIP-L and CLIP-G for SDXL); raise naming what is connected."""
    outer = getattr(clip, "cond_stage_model", None)
    tokenizer = getattr(clip, "tokenizer", None)
    attr = getattr(outer, "clip", None)
    if hasattr(outer, "t5xxl"):  # SD3's and Flux's text encoders: another architecture's
        pairs = []
    elif isinstance(attr, str) and hasattr(outer, "clip_name"):
        pairs = [(outer.clip_name, attr)]
    elif hasattr(outer, "clip_l") and hasattr(outer, "clip_g"):
        pairs = [("l", "clip_l"), ("g", "clip_g")]
    else:
        pairs = []
    encoders = []
    for key, name in pairs:
        inner, sub_tokenizer = getattr(outer, name, None), getattr(tokenizer, name, None)
        if hasattr(inner, "process_tokens") and hasattr(inner, "transformer") and sub_tokenizer is not None:
            encoders.append(ClipEncoder(clip, key, inner, sub_tokenizer.embedding_key))
    if not encoders or len(encoders) != len(pairs):
        name = type(outer).__name__ if outer is not None else type(clip).__name__
        raise ValueError(
            f"{node}: the connected CLIP ({name}) is not an SD1.x, SD2.x or SDXL text encoder; connect the CLIP "
            "output of the same CheckpointLoaderSimple as the model"
        )
    return encoders


def initializer_vectors(encoder: ClipEncoder, word: str, count: int) -> torch.Tensor:
    """Return `count` starting vectors copied from the initializer's token embeddings (reference: i * len // n)."""
    if not word or not word.strip():
        raise ValueError("initializer is empty; give a word that describes the reference, e.g. 'girl' or 'painting'")
    tokens = encoder.clip.tokenize(word)[encoder.key]
    special = {int(t) for t in encoder.module.special_tokens.values() if t is not None}
    ids = [int(t) for chunk in tokens for t, *_ in chunk if isinstance(t, int) and int(t) not in special]
    if not ids:
        raise ValueError(f"initializer {word!r} encodes to no word tokens; use a plain word such as 'girl'")
    table = encoder.module.transformer.get_input_embeddings().weight
    return vct_ops.init_concept_vectors(table[ids].detach().float().cpu(), count)


def text_device(clip) -> torch.device:
    """Return the device the text encoder runs on: its patcher's load device, as ComfyUI's own encode uses.

    Under Dynamic VRAM the weights stay in system memory, so their device says nothing.
    """
    return clip.patcher.load_device


class GradientEncoder:
    """Concept vectors -> the model's conditioning dict, with gradients to the vectors.

    Mirrors ComfyUI's encode path (per-encoder forward, SDXL's CLIP-L/CLIP-G concatenation and
    pooled output) without its in-place operations; `to_model` turns the resulting CONDITIONING
    into what the model takes (the model's own `extra_conds`), keeping gradients.
    """

    def __init__(self, encoders: list[ClipEncoder], to_model: Callable[[list], dict]) -> None:
        """Prepare the encoders with the options encode_from_tokens would set (e.g. CLIPSetLastLayer).

        The text encoder runs on its patcher's load device, where ComfyUI's own encode runs it:
        under Dynamic VRAM its weights stay in system memory, cast per call.
        """
        self.encoders, self.to_model = encoders, to_model
        clip = encoders[0].clip
        self.text_device = text_device(clip)
        self.tokenized = {"": clip.tokenize("")}  # the concept prompt's frame, tokenized once for every step
        clip.cond_stage_model.reset_clip_options()
        if getattr(clip, "layer_idx", None) is not None:
            clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})

    def __call__(self, vectors: dict) -> dict:
        """Return the model's conditioning dict for the concept prompt made of `vectors`."""
        outputs = [e.encode(vectors[e.key], self.tokenized, self.text_device) for e in self.encoders]
        if len(outputs) == 1:
            cond, pooled = outputs[0]
        else:  # SDXL: CLIP-L and CLIP-G side by side, pooled output from CLIP-G
            tokens = min(out.shape[1] for out, _ in outputs)
            cond = torch.cat([out[:, :tokens] for out, _ in outputs], dim=-1)
            pooled = outputs[-1][1]
        return self.to_model([[cond, {"pooled_output": pooled}]])


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
