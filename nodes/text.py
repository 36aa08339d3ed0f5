"""Text-encoder glue: initializer tokens, concept prompts built from vectors, and a gradient-safe encode.

A concept prompt is the token list `embedding:NAME` produces: [start, v1, ..., vn, end, padding],
per text encoder (one for SD1.x/SD2.x, CLIP-L and CLIP-G for SDXL), so the conditioning the
nodes output equals what a plain CLIPTextEncode of `embedding:NAME` gives once the vectors are saved.
"""
from __future__ import annotations

import dataclasses
import zlib

import torch

from .. import vct_ops
from . import compat, inputs


@dataclasses.dataclass
class TextEncoder:
    """One text encoder of a CLIP object: its token key ('l', 'h', 'g'), its module and its embedding-file key."""

    clip: object
    key: str
    module: torch.nn.Module
    embedding_key: str

    @property
    def width(self) -> int:
        """Return the token-embedding width."""
        return self.module.transformer.get_input_embeddings().weight.shape[-1]


def text_encoders(clip, node: str) -> list[TextEncoder]:
    """Return the text encoders of `clip` (one, or CLIP-L and CLIP-G for SDXL); raise naming what is connected."""
    outer = getattr(clip, "cond_stage_model", None)
    tokenizer = getattr(clip, "tokenizer", None)
    attr = getattr(outer, "clip", None)
    if isinstance(attr, str) and hasattr(outer, "clip_name"):
        pairs = [(outer.clip_name, attr)]
    elif hasattr(outer, "clip_l") and hasattr(outer, "clip_g"):
        pairs = [("l", "clip_l"), ("g", "clip_g")]
    else:
        pairs = []
    encoders = []
    for key, name in pairs:
        inner, sub_tokenizer = getattr(outer, name, None), getattr(tokenizer, name, None)
        if hasattr(inner, "process_tokens") and hasattr(inner, "transformer") and sub_tokenizer is not None:
            encoders.append(TextEncoder(clip, key, inner, sub_tokenizer.embedding_key))
    if not encoders or len(encoders) != len(pairs):
        name = type(outer).__name__ if outer is not None else type(clip).__name__
        raise ValueError(
            f"{node}: the connected CLIP ({name}) is not an SD1.x, SD2.x or SDXL text encoder; connect the CLIP "
            "output of the same CheckpointLoaderSimple as the model"
        )
    return encoders


def initializer_vectors(encoder: TextEncoder, word: str, count: int) -> torch.Tensor:
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


# Keys VCT adds to a CONDITIONING's options, read by the Dual-Branch Sampler to align token maps:
# the prompt's token ids from start to end token (concept vectors as CONCEPT ids, other embedding
# vectors as OTHER ids), and the same CLIP's encoding of the empty prompt (the paper's source).
LAYOUT_KEY = "vct_token_layout"
EMPTY_PROMPT_KEY = "vct_empty_prompt"
PLACEHOLDER = "{concept}"
# Ids of another embedding's vectors lie below this, derived from the vector's values (see
# spliced_tokens); concept vectors take -1, -2, ... above it, real tokens are non-negative.
OTHER_EMBEDDING = -1000


def concept_id(index: int) -> int:
    """Return the layout id of the `index`-th concept vector (-1, -2, ...: no real token has it)."""
    return -1 - index


def is_concept_id(layout_id: int) -> bool:
    """Return whether a layout id is one of a concept vector's."""
    return OTHER_EMBEDDING < layout_id < 0


def _tokenize(encoder: TextEncoder, text: str, tokenized: dict | None) -> list:
    """Return the chunks of `text` for `encoder`, taken from `tokenized` (text -> clip.tokenize(text)) when given."""
    if tokenized is None:
        return encoder.clip.tokenize(text)[encoder.key]
    if text not in tokenized:
        tokenized[text] = encoder.clip.tokenize(text)  # every encoder's tokens at once
    return tokenized[text][encoder.key]


def _word_tokens(encoder: TextEncoder, text: str, end: int, tokenized: dict | None) -> list:
    """Return the (token, weight) pairs of `text` between its start and its `end` token."""
    if not text.strip():
        return []
    chunks = _tokenize(encoder, text, tokenized)
    if len(chunks) > 1:
        raise ValueError("the prompt is longer than one 77-token chunk; VCT needs it to fit in one")
    chunk = chunks[0]
    stop = next((i for i in range(1, len(chunk)) if isinstance(chunk[i][0], int) and chunk[i][0] == end),
                len(chunk))
    return [tuple(pair[:2]) for pair in chunk[1:stop]]


def spliced_tokens(encoder: TextEncoder, before: str, vectors, after: str,
                   tokenized: dict | None = None) -> tuple[list, list]:
    """Return (token list as ComfyUI's tokenizer gives it, layout ids) of `before` + concept vectors + `after`.

    Equal to what `before embedding:NAME after` tokenizes to once the vectors are saved as NAME.
    `tokenized` (text -> clip.tokenize(text)) is filled and reused, so each text is tokenized once
    for all of a CLIP's encoders and across calls.
    """
    base = _tokenize(encoder, "", tokenized)[0]
    head = _word_tokens(encoder, before, base[1][0], tokenized)
    tail = _word_tokens(encoder, after, base[1][0], tokenized)
    count = 0 if vectors is None else vectors.shape[0]
    middle = [(vectors[i], 1.0) for i in range(count)]
    used = 2 + len(head) + count + len(tail)
    if used > len(base):
        raise ValueError(f"the prompt takes {used} tokens; at most {len(base)} fit (shorten the text)")
    tokens = [base[0]] + head + middle + tail + list(base[1 : len(base) - used + 2])
    def layout_id(token):
        # Another embedding's vector: an id from its values, so the same vector in the source and
        # the concept prompt aligns and different ones never do.
        if isinstance(token, int):
            return int(token)
        digest = zlib.crc32(token.detach().float().cpu().numpy().tobytes())
        return OTHER_EMBEDDING - 1 - digest

    layout = ([int(base[0][0])] + [layout_id(t) for t, _ in head] + [concept_id(i) for i in range(count)]
              + [layout_id(t) for t, _ in tail] + [int(base[1][0])])
    return tokens, layout


def concept_tokens(encoder: TextEncoder, vectors: torch.Tensor, tokenized: dict | None = None) -> list:
    """Return the token list of a prompt made only of the concept vectors, as `embedding:NAME` tokenizes it."""
    return spliced_tokens(encoder, "", vectors, "", tokenized)[0]


def open_weight_groups(text: str) -> int:
    """Return how many (text:weight) groups `text` leaves open; escaped \\( and \\) are literal, as in ComfyUI."""
    literal = text.replace("\\)", "").replace("\\(", "")
    return literal.count("(") - literal.count(")")


def encode_prompt(encoders: list[TextEncoder], text: str, vectors: dict | None) -> list:
    """Return the CONDITIONING of `text` with the concept vectors (per encoder key) at its {concept}, if any.

    The conditioning records its token layout and the same CLIP's empty-prompt encoding, so the
    Dual-Branch Sampler aligns it with the source prompt.
    """
    if vectors is not None and text.count(PLACEHOLDER) != 1:
        raise ValueError(f"put {PLACEHOLDER} exactly once in the text, where the concept goes "
                         f"(e.g. 'a photo of {PLACEHOLDER}, oil painting')")
    if vectors is None and PLACEHOLDER in text:
        raise ValueError(f"the text has {PLACEHOLDER} but no concept is connected; connect VCT Concept Embedding "
                         "Learn's concept output")
    before, _, after = text.partition(PLACEHOLDER)
    if open_weight_groups(before) > 0:
        raise ValueError(f"{PLACEHOLDER} is inside a (text:weight) group; put it outside, e.g. "
                         f"'a photo of {PLACEHOLDER}, (oil painting:1.2)'")
    tokens, layout, tokenized = {}, None, {}
    for e in encoders:
        vec = vectors[e.key].detach().float().cpu() if vectors is not None else None
        e_tokens, e_layout = spliced_tokens(e, before, vec, after, tokenized)
        tokens[e.key] = [e_tokens]
        # An embedding:NAME that this encoder cannot read (no vectors of its width, or none at all) is
        # dropped by ComfyUI, which moves every later token: the recorded layout would be wrong.
        unreadable = any(torch.is_tensor(t) and t.shape[-1] != e.width for t, *_ in e_tokens)
        if unreadable or (layout is not None and [is_concept_id(t) for t in e_layout]
                          != [is_concept_id(t) for t in layout]):
            raise ValueError(
                f"clip_{e.key} cannot read an embedding:NAME in the prompt (it has no vectors {e.width} wide for "
                "it), so the prompt's tokens would not line up. Use an embedding with vectors for every text encoder "
                "of this model (for SDXL, clip_l and clip_g), or remove it"
            )
        layout = layout or e_layout  # positions are shared by every encoder of a CLIP
    clip = encoders[0].clip
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    out[LAYOUT_KEY] = layout
    out[EMPTY_PROMPT_KEY] = clip.encode_from_tokens(tokenized[""], return_pooled=False).detach().float().cpu()
    return [[cond, out]]


def encode_concept(encoders: list[TextEncoder], vectors: dict) -> list:
    """Return the CONDITIONING of the concept prompt (the vectors alone) through ComfyUI's regular encoding."""
    return encode_prompt(encoders, PLACEHOLDER, vectors)


class GradientEncoder:
    """Concept vectors -> the model's conditioning dict, with gradients to the vectors.

    Mirrors ComfyUI's encode path (per-encoder forward, SDXL's CLIP-L/CLIP-G concatenation and
    pooled output, the model's `extra_conds`) without its in-place operations.
    """

    def __init__(self, encoders: list[TextEncoder], model, latent_shape, device: torch.device) -> None:
        """Prepare the encoders with the options encode_from_tokens would set (e.g. CLIPSetLastLayer).

        `device` is the model's. The text encoder runs on its patcher's load device, where ComfyUI's
        own encode runs it: under Dynamic VRAM its weights stay in system memory, cast per call.
        """
        self.encoders, self.model, self.latent_shape, self.device = encoders, model, latent_shape, device
        self.text_device = compat.text_device(encoders[0].clip)
        clip = encoders[0].clip
        self.tokenized = {"": clip.tokenize("")}  # the concept prompt's frame, tokenized once for every step
        clip.cond_stage_model.reset_clip_options()
        if getattr(clip, "layer_idx", None) is not None:
            clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})

    def __call__(self, vectors: dict) -> dict:
        """Return the model's conditioning dict for the concept prompt made of `vectors`."""
        outputs = [self._encode(e, vectors[e.key]) for e in self.encoders]
        if len(outputs) == 1:
            cond, pooled = outputs[0]
        else:  # SDXL: CLIP-L and CLIP-G side by side, pooled output from CLIP-G
            tokens = min(out.shape[1] for out, _ in outputs)
            cond = torch.cat([out[:, :tokens] for out, _ in outputs], dim=-1)
            pooled = outputs[-1][1]
        conditioning = [[cond, {"pooled_output": pooled}]]
        conds = inputs.model_cond(self.model, conditioning, "concept", self.latent_shape, detach=False)
        return {key: value.to(self.device) for key, value in conds.items()}

    def _encode(self, encoder: TextEncoder, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        module = encoder.module
        text_device = self.text_device
        tokens = [pair[0] for pair in concept_tokens(encoder, vectors.to(text_device), self.tokenized)]  # weights 1
        embeds, mask, num_tokens, _ = module.process_tokens([tokens], text_device)
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
