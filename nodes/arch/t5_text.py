"""ComfyUI's T5 encoder (SD3's and Flux's T5-XXL) for concept learning: its token stream with concept
vectors spliced in, and its forward with gradients to the input embeddings.

Concept learning on SD3 and Flux puts the concept vectors at T5's input, so T5 runs forward and
backward at every step. ComfyUI's T5 adds its residuals in place (`x += ...`), which autograd
cannot go through once the embeddings need gradients; this is the same computation written out
without them, on the module's own weights.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..tokens import concept_id, token_id


def _norm(layer_norm, x: torch.Tensor) -> torch.Tensor:
    # T5's RMS norm (no mean, no bias), as comfy.text_encoders.t5.T5LayerNorm computes it.
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer_norm.variance_epsilon)
    return layer_norm.weight.to(x) * x


def t5_forward(t5, embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return the last hidden state (after the final norm) of ComfyUI's `T5` module for input embeddings `embeds`."""
    stack = t5.encoder
    x = embeds.float()
    length = x.shape[1]
    mask = None
    if attention_mask is not None:  # 0 where a key is padding, as ComfyUI builds it
        keep = attention_mask.to(x.dtype).reshape(attention_mask.shape[0], 1, 1, length)
        mask = (1.0 - keep).masked_fill((1.0 - keep).to(torch.bool), -torch.finfo(x.dtype).max)
    bias = None
    for block in stack.block:
        attention, feed_forward = block.layer[0], block.layer[-1]
        inner = attention.SelfAttention
        if inner.relative_attention_bias is not None:
            bias = inner.compute_bias(length, length, x.device, x.dtype)
        h = _norm(attention.layer_norm, x)
        heads = inner.num_heads
        q, k, v = (proj(h) for proj in (inner.q, inner.k, inner.v))
        q, k, v = (t.view(t.shape[0], length, heads, -1).transpose(1, 2) for t in (q, k, v))
        # T5 does not scale its logits by 1/sqrt(d): scale 1 here (ComfyUI multiplies k by sqrt(d)).
        full = bias if mask is None else bias + mask
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full.to(q.dtype), scale=1.0)
        x = x + inner.o(o.transpose(1, 2).reshape(x.shape[0], length, -1))
        x = x + feed_forward.DenseReluDense(_norm(feed_forward.layer_norm, x))
    return _norm(stack.final_layer_norm, x)


def _word_pairs(chunks: list, end: int) -> list:
    """Return the (token, weight) pairs of one text's chunks in T5's stream, up to its end token."""
    if len(chunks) > 1:
        raise ValueError("the prompt is longer than T5 takes in one pass; shorten it")
    pairs = [tuple(pair[:2]) for pair in chunks[0]]
    stop = next((i for i, (t, _) in enumerate(pairs) if isinstance(t, int) and t == end), len(pairs))
    return pairs[:stop]


def spliced(tokenize: Callable[[str], list], before: str, vectors: Optional[torch.Tensor], after: str
            ) -> tuple[list, list]:
    """Return (T5's token list, layout ids) of `before` + the concept vectors + `after`, `tokenize` giving a
    text's chunks for this tokenizer; the layout runs from the first word to the end token."""
    base = [tuple(pair[:2]) for pair in tokenize("")[0]]  # [end, pad, pad, ...]
    end, pad = base[0], base[1] if len(base) > 1 else None
    count = 0 if vectors is None else vectors.shape[0]
    head = _word_pairs(tokenize(before), end[0]) if before.strip() else []
    tail = _word_pairs(tokenize(after), end[0]) if after.strip() else []
    content = head + [(vectors[i], 1.0) for i in range(count)] + tail + [end]
    padding = [pad] * max(0, len(base) - len(content)) if pad is not None else []
    layout = ([token_id(t) for t, _ in head] + [concept_id(i) for i in range(count)]
              + [token_id(t) for t, _ in tail] + [int(end[0])])
    return content + padding, layout


def t5_spliced_tokens(clip, key: str, before: str, vectors: Optional[torch.Tensor], after: str) -> list:
    """Return T5's token list (for the CLIP object's tokenizer `key`, e.g. 't5xxl') of `before` + the concept
    vectors + `after`: what `before embedding:NAME after` tokenizes to once the vectors are saved as NAME.

    T5's stream is [words..., end, padding] with no start token, padded to the tokenizer's minimum
    length (77 for SD3, 256 for Flux) and longer when the words need it.
    """
    return spliced(lambda text: clip.tokenize(text)[key], before, vectors, after)[0]


@dataclasses.dataclass
class T5Encoder:
    """T5-XXL in a CLIP object (SD3's, Flux's): token key 't5xxl', its `T5XXLModel` module, embedding-file key 't5xxl'.

    Its output fills the model's T5 segment of text tokens; it has no pooled output.
    """

    clip: object
    key: str
    module: torch.nn.Module
    embedding_key: str
    segment: Optional[str] = "t5"
    start = False  # T5's token stream has no start token

    @property
    def width(self) -> int:
        """Return the token-embedding width (4096 for T5-XXL)."""
        return self.module.transformer.get_input_embeddings().weight.shape[-1]

    def splice(self, before: str, vectors, after: str, tokenized: dict | None = None) -> tuple[list, list]:
        """Return (token list, layout ids) of `before` + the concept vectors + `after` in T5's stream."""
        cache = {} if tokenized is None else tokenized

        def tokenize(text: str) -> list:
            if text not in cache:
                cache[text] = self.clip.tokenize(text)  # every encoder's tokens at once
            return cache[text][self.key]

        return spliced(tokenize, before, vectors, after)

    def encode(self, vectors: torch.Tensor, tokenized: dict, device) -> tuple[torch.Tensor, None]:
        """Return (last hidden state, None) of the prompt made of `vectors` alone, with gradients to them."""
        module = self.module
        if module.layer != "last":
            raise ValueError("concept learning through T5 needs its last layer; remove CLIPSetLastLayer before VCT")
        tokens = [pair[0] for pair in self.splice("", vectors.to(device), "", tokenized)[0]]
        embeds, mask, _, _ = module.process_tokens([tokens], device)
        z = t5_forward(module.transformer, embeds, mask if module.enable_attention_masks else None)
        if module.zero_out_masked:
            z = z * mask.unsqueeze(-1).float()
        return z.float(), None
