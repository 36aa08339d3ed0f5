"""Prompts with a learned concept in them, encoded through ComfyUI's own tokenizer and encoder.

A concept prompt is the token list `embedding:NAME` produces: [start, v1, ..., vn, end, padding],
per text encoder (one for SD1.x/SD2.x, CLIP-L and CLIP-G for SDXL), so the conditioning the
nodes output equals what a plain CLIPTextEncode of `embedding:NAME` gives once the vectors are
saved. Every prompt records its token layout (see tokens.py) for the sampler's alignment. An encoder
is one of the architecture's text encoders (`arch.clip_text.ClipEncoder`: `clip`, `key`).
"""
from __future__ import annotations

import torch

from .tokens import EMPTY_PROMPT_KEY, LAYOUT_KEY, Segment, concept_id, is_concept_id, record, token_id

PLACEHOLDER = "{concept}"


def _tokenize(encoder, text: str, tokenized: dict | None) -> list:
    """Return the chunks of `text` for `encoder`, taken from `tokenized` (text -> clip.tokenize(text)) when given."""
    if tokenized is None:
        return encoder.clip.tokenize(text)[encoder.key]
    if text not in tokenized:
        tokenized[text] = encoder.clip.tokenize(text)  # every encoder's tokens at once
    return tokenized[text][encoder.key]


def _word_tokens(encoder, text: str, end: int, tokenized: dict | None) -> list:
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


def spliced_tokens(encoder, before: str, vectors, after: str,
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
    layout = ([int(base[0][0])] + [token_id(t) for t, _ in head] + [concept_id(i) for i in range(count)]
              + [token_id(t) for t, _ in tail] + [int(base[1][0])])
    return tokens, layout


def concept_token_list(encoder, vectors: torch.Tensor, tokenized: dict | None = None) -> list:
    """Return the token list of a prompt made only of the concept vectors, as `embedding:NAME` tokenizes it."""
    return encoder.splice("", vectors, "", tokenized)[0]


def _names(keys: list) -> str:
    """Return 'a', 'a and b' or 'a, b and c'."""
    return keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"


def open_weight_groups(text: str) -> int:
    """Return how many (text:weight) groups `text` leaves open; escaped \\( and \\) are literal, as in ComfyUI."""
    literal = text.replace("\\)", "").replace("\\(", "")
    return literal.count("(") - literal.count(")")


def encode_prompt(encoders: list, text: str, vectors: dict | None) -> list:
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
    tokens, spans, tokenized = {}, {}, {}
    for e in encoders:
        vec = vectors[e.key].detach().float().cpu() if vectors is not None else None
        e_tokens, e_layout = e.splice(before, vec, after, tokenized)
        tokens[e.key] = [e_tokens]
        # An embedding:NAME that this encoder cannot read (no vectors of its width, or none at all) is
        # dropped by ComfyUI, which moves every later token: the recorded layout would be wrong.
        unreadable = any(torch.is_tensor(t) and t.shape[-1] != e.width for t, *_ in e_tokens)
        shared = spans.get(e.segment)
        if unreadable or (shared is not None and [is_concept_id(t) for t in e_layout]
                          != [is_concept_id(t) for t in shared[1]]):
            raise ValueError(
                f"{e.embedding_key} cannot read an embedding:NAME in the prompt (it has no vectors {e.width} wide "
                "for it), so the prompt's tokens would not line up. Use an embedding with vectors for every text "
                f"encoder of this model ({_names([x.embedding_key for x in encoders])}), or remove it"
            )
        if e.segment is not None and shared is None:  # positions are shared by the encoders of a segment
            spans[e.segment] = (len(e_tokens), e_layout, e.start)
    clip = encoders[0].clip
    # Tokenizers without a loaded encoder (SD3 without CLIP-L/G) still take part in ComfyUI's encode.
    out = clip.encode_from_tokens({**tokenized[""], **tokens}, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    segments, offset = [], 0
    for length, layout, start in spans.values():  # in the order the model's text tokens put them
        segments.append(Segment(offset, length, tuple(layout), start))
        offset += length
    if len(segments) > 1 and offset != cond.shape[1]:
        raise ValueError(f"the text encoders gave {cond.shape[1]} tokens where {offset} were expected; connect the "
                         "CLIP of the checkpoint as its loader gives it")
    out[LAYOUT_KEY] = record(segments)
    out[EMPTY_PROMPT_KEY] = clip.encode_from_tokens(tokenized[""], return_pooled=False).detach().float().cpu()
    return [[cond, out]]


def encode_concept(encoders: list, vectors: dict) -> list:
    """Return the CONDITIONING of the concept prompt (the vectors alone) through ComfyUI's regular encoding."""
    return encode_prompt(encoders, PLACEHOLDER, vectors)
