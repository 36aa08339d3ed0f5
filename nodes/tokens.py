"""Token alignment for the cross-attention refine: layout ids, recorded layouts, the refine mapping's
inputs and the equaliser's positions.

A token layout is a prompt's token ids from its start token to its end token. Real tokens keep
their ids; a concept vector gets a negative id (`concept_id`), another embedding's vector an id
from its values below OTHER_EMBEDDING. VCT's prompt nodes record the layout in the
CONDITIONING's options (LAYOUT_KEY), with the same CLIP's encoding of the empty prompt
(EMPTY_PROMPT_KEY, the paper's source prompt), and the sampler aligns source and concept by them.

A model's text tokens may come in segments, one per group of encoders that share positions: SD1.x,
SD2.x and SDXL have one (CLIP, 77 tokens from a start token), SD3 has CLIP-L/G's 77 then T5's,
Flux T5's alone (T5 has no start token). A single CLIP segment is recorded as a plain list of ids,
as earlier versions recorded every layout; several, or one without a start token, as a list of
`Segment` dicts. The refine mapping and the equaliser are built per segment and put side by side.
"""
from __future__ import annotations

import dataclasses
import logging
import zlib

import torch

from .. import vct_ops

log = logging.getLogger("ComfyUI-VCT")

LAYOUT_KEY = "vct_token_layout"
EMPTY_PROMPT_KEY = "vct_empty_prompt"
# Ids of another embedding's vectors lie below this; concept vectors take -1, -2, ... above it,
# real tokens are non-negative.
OTHER_EMBEDDING = -1000
# The ends of every layout, as symbols: layouts recorded by the pack carry the tokenizer's real
# start and end ids, the paper's layout (assumed) does not know them.
START, END = -(1 << 40), -(1 << 40) - 1  # below every other layout id
EQUALIZERS = ("concept_tokens", "reference_code")


def concept_id(index: int) -> int:
    """Return the layout id of the `index`-th concept vector (-1, -2, ...: no real token has it)."""
    return -1 - index


def is_concept_id(layout_id: int) -> bool:
    """Return whether a layout id is one of a concept vector's."""
    return OTHER_EMBEDDING < layout_id < 0


def token_id(token) -> int:
    """Return the layout id of one token of a ComfyUI token list: its id, or for an embedding's vector one from
    its values, so the same vector in the source and the concept prompt aligns and different ones never do."""
    if isinstance(token, int):
        return int(token)
    digest = zlib.crc32(token.detach().float().cpu().numpy().tobytes())
    return OTHER_EMBEDDING - 1 - digest


def check_same_length(tokens: int, expected: int, name: str, expected_name: str, fix: str) -> None:
    """Raise ValueError when a conditioning does not have as many tokens as the one it must pair with."""
    if tokens != expected:
        raise ValueError(f"{name} encodes to {tokens} tokens but {expected_name} to {expected}; {fix}")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One span of a model's text tokens: first position, length, layout ids, whether it has a start token."""

    offset: int
    length: int
    ids: tuple
    start: bool = True

    def symbolic(self) -> "Segment":
        """Return the segment with its start and end tokens as the START/END symbols."""
        inner = [int(t) for t in self.ids[(1 if self.start else 0):-1]]
        return dataclasses.replace(self, ids=tuple(([START] if self.start else []) + inner + [END]))

    def emptied(self) -> "Segment":
        """Return the same span holding the empty prompt (its start and end tokens only)."""
        return dataclasses.replace(self, ids=(START, END) if self.start else (END,))


def record(segments: list[Segment]) -> list:
    """Return the JSON-ready record of a prompt's segments (a plain id list for one CLIP segment)."""
    if len(segments) == 1 and segments[0].start and segments[0].offset == 0:
        return [int(t) for t in segments[0].ids]
    return [{"offset": s.offset, "length": s.length, "start": s.start, "ids": [int(t) for t in s.ids]}
            for s in segments]


def segments_of(recorded: list, length: int) -> list[Segment]:
    """Return the segments of a recorded layout; a plain id list is one CLIP segment over all `length` tokens."""
    if recorded and isinstance(recorded[0], dict):
        return [Segment(int(d["offset"]), int(d["length"]), tuple(d["ids"]), bool(d["start"])) for d in recorded]
    return [Segment(0, length, tuple(recorded), True)]


def paper_layout(count: int) -> list[int]:
    """Return the layout of a prompt made of `count` concept vectors alone: [start, c1..cn, end]."""
    return [START] + [concept_id(i) for i in range(count)] + [END]


def equalizer_positions(layout: list, equalizer: str, start: bool = True) -> list[int]:
    """Return the token positions the equaliser scales in a concept prompt's layout (of one segment).

    `concept_tokens` scales the concept vectors' positions. `reference_code` reproduces the
    reference implementation, whose word-index helper drops the start token's +1 and so scales
    the position before each: with the paper's layout, the start token and all but the last
    concept token. A segment without a start token (T5) has no +1 to drop: there both are the same.
    """
    if equalizer not in EQUALIZERS:
        raise ValueError(f"equalizer must be one of {', '.join(EQUALIZERS)}, got {equalizer!r}")
    positions = [j for j, token in enumerate(layout) if is_concept_id(token)]
    return positions if equalizer == "concept_tokens" or not start else [p - 1 for p in positions]


def token_layouts(source: torch.Tensor, source_layout, concept: list, concept_tokens: int, node: str
                  ) -> tuple[list[Segment], list[Segment]]:
    """Return the (source, concept) segments the refine mapping aligns, with symbolic ends, from what the inputs record.

    The concept's comes from its conditioning (VCT Concept Embedding Learn, VCT Concept Prompt) or
    from `concept_tokens` for a plain `embedding:NAME` prompt (one CLIP segment only); the source's
    from the inversion (its conditioning came from VCT Concept Prompt) or, for the paper's empty
    prompt, from the concept's record of the same CLIP's empty-prompt encoding.
    """
    cond, options = concept[0][0], concept[0][1]
    length = cond.shape[1]
    recorded = options.get(LAYOUT_KEY)
    if cond.shape[1:] == source.shape[1:] and torch.equal(cond.cpu().float(), source.cpu().float()):
        # The concept is the source prompt: every token aligns.
        whole = segments_of(recorded, length) if recorded else [Segment(0, length, (START, END))]
        empty = [s.emptied() for s in whole]
        return empty, empty
    if recorded:
        target = [s.symbolic() for s in segments_of(recorded, length)]
    elif concept_tokens > 0:
        target = [Segment(0, length, tuple(paper_layout(concept_tokens)))]
    else:
        raise ValueError(
            f"{node}: the concept conditioning does not say where its concept tokens are. Connect it from VCT "
            "Concept Embedding Learn or VCT Concept Prompt, or, for a CLIPTextEncode of exactly embedding:NAME, set "
            "concept_tokens to the number of vectors in that embedding"
        )
    empty_source = [s.emptied() for s in target]
    if source_layout:
        found = [s.symbolic() for s in segments_of(source_layout, source.shape[1])]
        if [(s.offset, s.length, s.start) for s in found] != [(s.offset, s.length, s.start) for s in target]:
            raise ValueError(f"{node}: the source prompt's text tokens are laid out unlike the concept prompt's; "
                             "encode both with VCT Concept Prompt from the same CLIP")
        return found, target
    empty = options.get(EMPTY_PROMPT_KEY)
    if empty is None:
        # A plain embedding:NAME concept with concept_tokens set, and a source that records nothing:
        # the paper's layout is assumed and nothing can confirm it, so the user is told.
        log.warning("%s: neither prompt records its tokens, so the paper's layout is assumed: the concept "
                    "prompt is exactly embedding:NAME with concept_tokens = %d vectors, and the source prompt is "
                    "empty. Nothing can check that count: if NAME has another number of vectors, the equaliser and "
                    "the cross-attention alignment fall on the wrong tokens. For any other prompts, or to have the "
                    "count read instead of assumed, encode both with VCT Concept Prompt", node, concept_tokens)
        return empty_source, target
    if empty.shape[1:] == source.shape[1:] and torch.allclose(empty.float().cpu(), source.float().cpu(),
                                                              rtol=1e-3, atol=1e-3):
        return empty_source, target
    log.warning("%s: the source prompt is not empty and its tokens are unknown, so its cross-attention maps are "
                "aligned as if it were empty. Encode the source prompt with VCT Concept Prompt before VCT DDIM "
                "Invert to align it word by word", node)
    return empty_source, target


def injection_config(source: torch.Tensor, concept: list, self_fraction: float, cross_fraction: float,
                     concept_weight: float, concept_tokens: int, equalizer: str = "concept_tokens",
                     source_layout=None, node: str = "VCT Dual-Branch Sampler") -> vct_ops.InjectionConfig:
    """Return the injection settings: the refine mapping of the source prompt's tokens to the concept prompt's,
    segment by segment."""
    length = concept[0][0].shape[1]
    sources, targets = token_layouts(source, source_layout, concept, concept_tokens, node)
    mapper, alphas = torch.arange(length, dtype=torch.long), torch.ones(length)
    scaled, concept_positions = [], []
    for src, tgt in zip(sources, targets):
        part, part_alphas = vct_ops.refine_mapping(list(src.ids), list(tgt.ids), tgt.length)
        span = slice(tgt.offset, tgt.offset + tgt.length)
        mapper[span], alphas[span] = part + tgt.offset, part_alphas
        scaled += [tgt.offset + p for p in equalizer_positions(list(tgt.ids), equalizer, tgt.start)]
        concept_positions += [tgt.offset + p for p in equalizer_positions(list(tgt.ids), "concept_tokens")]
    weights = vct_ops.token_weights(length, scaled, concept_weight)
    return vct_ops.InjectionConfig(self_fraction, cross_fraction, mapper, alphas, weights,
                                   concept_positions=tuple(concept_positions))
