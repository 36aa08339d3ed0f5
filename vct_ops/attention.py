"""Attention control for the dual-branch sampler, in ComfyUI's attention-replace contract.

A replace function is `fn(q, k, v, extra_options) -> out` with `q, k, v` shaped
`[rows, tokens, heads * dim_head]` and the head count in `extra_options["n_heads"]`. The sampler
tags every row of its batch with a role in `extra_options[ROLES_KEY]`: `"uncond"`, `"ref"` (the
reconstruction branch B*), `"main"` (the translation branch B) or `"appearance"` (the reference
image R, when appearance attention is on). Only the conditional rows of B are changed, and only
inside step windows that are derived from the current sigma. Nothing is kept across calls, so no
attention map outlives the layer that computed it, except what the sampler asks for: with local
blend, B's maps at the concept tokens are added into the run's accumulator (local_blend.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .appearance import ROLE_APPEARANCE, AppearanceConfig, AppearanceWindow, appearance_queries, blend
from .local_blend import BLEND_KEY
from .schedule import window_sigma

ROLES_KEY = "vct_roles"
ROLE_UNCOND, ROLE_REF, ROLE_MAIN = "uncond", "ref", "main"
# The branch of every row (ROLE_REF for B*, ROLE_MAIN for B), unconditional rows included: what
# the host attaches per branch (e.g. a ControlNet on the concept) goes by it.
BRANCHES_KEY = "vct_branches"
# What the cross-attention refine does to B's maps: nothing, replace them by B*'s, or mix the two.
KEEP, BORROW, MIX = "keep", "borrow", "mix"

# (q, k, v, heads, extra_options) -> out; extra_options lets a host honour e.g. attn_precision.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], torch.Tensor]
ReplaceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    rows, tokens, width = t.shape
    return t.view(rows, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    rows, heads, tokens, dim = t.shape
    return t.transpose(1, 2).reshape(rows, tokens, heads * dim)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: Optional[dict] = None
) -> torch.Tensor:
    """Return softmax(q k^T / sqrt(d)) v for `[rows, tokens, heads * d]` inputs, via PyTorch's fused kernel."""
    out = torch.nn.functional.scaled_dot_product_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    )
    return _merge_heads(out)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Return the attention probabilities `[rows, heads, queries, keys]`, computed in at least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)  # half-precision logits can overflow
    qh, kh = _split_heads(q, heads).to(dtype), _split_heads(k, heads).to(dtype)
    scale = qh.shape[-1] ** -0.5
    return torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Return `probs @ v` merged back to `[rows, tokens, heads * d]`."""
    return _merge_heads(probs.to(v.dtype) @ _split_heads(v, heads))


def refine_mapping(
    source_ids: Sequence[int], target_ids: Sequence[int], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mapper, alphas) aligning target tokens to source tokens, as prompt-to-prompt's refine.

    Both id lists are the real token sequences (start and end tokens included, padding
    excluded). Tokens in a longest common subsequence map to their partner (alpha 1), chosen as
    prompt-to-prompt's traceback chooses among equally long ones; target tokens absent from the
    source keep their own maps (alpha 0). Padding maps to the same position (alpha 1) where the
    source has padding there too; where a longer source has a real token at that position, the
    target's padding keeps its own map (alpha 0). Give concept vectors ids no real token has
    (e.g. negative ones).
    """
    src, tgt = list(source_ids), list(target_ids)
    if len(src) > length or len(tgt) > length:
        raise ValueError(f"token sequences of {len(src)} and {len(tgt)} tokens do not fit in {length} positions")
    # Global alignment with match 1, mismatch -1, gap 0 (prompt-to-prompt's scores) scores the longest
    # common subsequence of the prefixes src[:i], tgt[:j].
    table = [[0] * (len(tgt) + 1) for _ in range(len(src) + 1)]
    for i in range(1, len(src) + 1):
        for j in range(1, len(tgt) + 1):
            if src[i - 1] == tgt[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    mapper = torch.arange(length, dtype=torch.long)
    alphas = torch.ones(length)
    mapper[: max(len(tgt), len(src))] = 0
    alphas[: max(len(tgt), len(src))] = 0.0
    # Walk back from the ends with prompt-to-prompt's preference among equal scores: leave the target
    # token unaligned, else skip the source token, else match. With a repeated token this picks the
    # same partner as the reference (source [S, x, x, E], target [S, y, x, E]: the first x).
    i, j = len(src), len(tgt)
    while i > 0 and j > 0:
        if table[i][j - 1] == table[i][j]:
            j -= 1
        elif table[i - 1][j] == table[i][j]:
            i -= 1
        else:
            mapper[j - 1], alphas[j - 1] = i - 1, 1.0
            i, j = i - 1, j - 1
    return mapper, alphas


def token_weights(length: int, positions: Sequence[int], value: float) -> torch.Tensor:
    """Return per-token weights: `value` at `positions`, 1 elsewhere (the concept-token equaliser)."""
    weights = torch.ones(length)
    for p in positions:
        if not 0 <= p < length:
            raise ValueError(f"token position {p} is outside 0..{length - 1}")
        weights[p] = value
    return weights


def _current_sigma(extra_options: dict) -> Optional[float]:
    sigma = extra_options.get("sigmas")
    if sigma is None:
        return None
    return float(torch.as_tensor(sigma).max())


def _role_rows(extra_options: dict, rows: int) -> Optional[tuple[list[int], list[int]]]:
    roles = extra_options.get(ROLES_KEY)
    if roles is None:
        return None
    if len(roles) != rows:
        raise RuntimeError(
            f"attention received {rows} rows but the sampler tagged {len(roles)}; another node split the "
            "VCT batch, which the dual-branch sampler does not support"
        )
    ref = [i for i, r in enumerate(roles) if r == ROLE_REF]
    main = [i for i, r in enumerate(roles) if r == ROLE_MAIN]
    if len(ref) != len(main):
        raise RuntimeError(f"the VCT batch has {len(ref)} reconstruction rows but {len(main)} translation rows")
    return (ref, main) if ref else None


def _appearance_rows(extra_options: dict, main: int) -> list[int]:
    roles = extra_options.get(ROLES_KEY) or []
    rows = [i for i, r in enumerate(roles) if r == ROLE_APPEARANCE]
    if rows and len(rows) != main:
        raise RuntimeError(f"the VCT batch has {len(rows)} reference rows but {main} translation rows")
    return rows


@dataclass
class InjectionConfig:
    """What B borrows from B*: windows as fractions of the steps, the refine mapping and the equaliser."""

    self_fraction: float = 0.9
    cross_fraction: float = 0.2
    mapper: Optional[torch.Tensor] = None
    alphas: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    # Self-attention layers with at most this fraction of the latent's positions as queries are
    # injected: 1/4 gives the reference's 32x32 limit for 64x64 latents (SD1.5 at 512 px), and
    # scales with resolution so that SDXL at 1024 px behaves alike.
    self_area_fraction: float = 0.25
    # Positions of the concept's own tokens in B's prompt (those no source token aligns to): where
    # local blend reads B's maps.
    concept_positions: tuple = ()

    def refine_effect(self, keys: int) -> str:
        """Return what the refine does to B's cross-attention maps over `keys` tokens: KEEP, BORROW or MIX."""
        unweighted = self.weights is None or bool(torch.all(self.weights == 1))
        if not unweighted:
            return MIX
        if self.mapper is None:
            return KEEP
        alphas = self.alphas if self.alphas is not None else torch.ones(self.mapper.numel())
        if self.mapper.numel() != keys or alphas.numel() != keys:
            return MIX  # refine() reports the mismatch
        if bool(torch.all(alphas == 0)):
            return KEEP
        identity = bool(torch.equal(self.mapper.cpu(), torch.arange(keys)))
        return BORROW if identity and bool(torch.all(alphas == 1)) else MIX


class AttentionController:
    """Per-run attention control: decides per call whether B's maps come from B*, from sigma and layer size."""

    def __init__(
        self, sigmas: torch.Tensor, config: InjectionConfig, attention: AttentionFn = sdpa_attention,
        appearance: Optional[AppearanceConfig] = None,
    ) -> None:
        """Build a controller for one sampling run over the descending schedule `sigmas`.

        With `appearance`, B's conditional rows also read the reference rows' keys and values
        (tagged "appearance") in the layers and steps it names.
        """
        self.config = config
        self.attention = attention
        self.self_threshold = window_sigma(sigmas, config.self_fraction)
        self.cross_threshold = window_sigma(sigmas, config.cross_fraction)
        self.appearance = AppearanceWindow(sigmas, appearance) if appearance is not None else None

    def _plain(self, q, k, v, extra_options, prev: Optional[ReplaceFn]) -> torch.Tensor:
        if prev is not None:
            return prev(q, k, v, extra_options)
        return self.attention(q, k, v, extra_options["n_heads"], extra_options)

    def self_active(self, extra_options: dict, queries: int) -> bool:
        """Return whether self-attention injection applies at this call's step, for a layer of `queries` tokens."""
        sigma = _current_sigma(extra_options)
        shape = extra_options.get("original_shape")
        if sigma is None or shape is None or not sigma > self.self_threshold:
            return False
        return queries <= self.config.self_area_fraction * shape[-1] * shape[-2]

    def cross_active(self, extra_options: dict) -> bool:
        """Return whether cross-attention refine applies at this call's step."""
        sigma = _current_sigma(extra_options)
        return sigma is not None and sigma > self.cross_threshold

    def appearance_active(self, extra_options: dict, queries: int, decoder: bool) -> bool:
        """Return whether B reads the reference's keys and values in this self-attention call."""
        sigma = _current_sigma(extra_options)
        shape = extra_options.get("original_shape")
        if self.appearance is None or sigma is None or shape is None:
            return False
        return self.appearance.active(sigma, queries, shape[-1] * shape[-2], decoder)

    def self_attention(self, q, k, v, extra_options: dict, prev: Optional[ReplaceFn] = None,
                       decoder: bool = False) -> torch.Tensor:
        """Return self-attention where B's rows use B*'s probabilities (their own values) when injected,
        blended with attention to the reference's keys and values where appearance attention acts."""
        pairs = _role_rows(extra_options, q.shape[0])
        if pairs is None:
            return self._plain(q, k, v, extra_options, prev)
        ref, main = pairs
        if not self.self_active(extra_options, q.shape[1]):
            out = self._plain(q, k, v, extra_options, prev)
        else:
            # softmax(q_ref k_ref^T) v_main is B* 's map applied to B's values: swap B's queries and
            # keys for B*'s and let the fused kernel do it, without materialising the map.
            q2, k2 = q.clone(), k.clone()
            q2[main], k2[main] = q[ref], k[ref]
            out = self._plain(q2, k2, v, extra_options, prev)
        look = _appearance_rows(extra_options, len(main))
        if not look or not self.appearance_active(extra_options, q.shape[1], decoder):
            return out
        cfg = self.appearance.config
        # softmax(T q k_R^T / sqrt(d)) v_R: the temperature goes into the queries, so the host's
        # fused attention computes it.
        queries = appearance_queries(q[main], q[ref], cfg.query_preservation) * cfg.temperature
        read = self.attention(queries, k[look], v[look], extra_options["n_heads"], extra_options)
        out = out.clone()
        out[main] = blend(out[main], read, cfg.strength)
        return out

    def cross_attention(self, q, k, v, extra_options: dict, prev: Optional[ReplaceFn] = None) -> torch.Tensor:
        """Return cross-attention where B's maps take B*'s at aligned tokens, with concept tokens re-weighted."""
        pairs = _role_rows(extra_options, q.shape[0])
        store = extra_options.get(BLEND_KEY)
        if pairs is not None and store is not None and store.wants(q.shape[1]):
            # B's own maps, before any refine (what prompt-to-prompt's blend reads).
            store.record(attention_probs(q[pairs[1]], k[pairs[1]], extra_options["n_heads"]))
        if pairs is None or not self.cross_active(extra_options):
            return self._plain(q, k, v, extra_options, prev)
        ref, main = pairs
        effect = self.config.refine_effect(k.shape[1])
        if effect == KEEP:
            return self._plain(q, k, v, extra_options, prev)
        if effect == BORROW and prev is None:
            # B takes B*'s maps unchanged: computed by the very function that computes B*'s rows,
            # in the same call, so B equals B* exactly when their inputs do (concept = source).
            q2, k2 = q.clone(), k.clone()
            q2[main], k2[main] = q[ref], k[ref]
            return self._plain(q2, k2, v, extra_options, prev)
        out = self._plain(q, k, v, extra_options, prev)
        heads = extra_options["n_heads"]
        probs_ref = attention_probs(q[ref], k[ref], heads)
        probs_main = attention_probs(q[main], k[main], heads)
        mixed = self.refine(probs_ref, probs_main)
        controlled = apply_probs(mixed, v[main], heads)
        out = out.clone()
        if prev is None:
            out[main] = controlled.to(out.dtype)
        else:
            # Another pack's patch (e.g. an image-prompt adapter) shaped `out`; keep its
            # contribution and change only the part the text attention makes.
            out[main] = out[main] + (controlled - apply_probs(probs_main, v[main], heads)).to(out.dtype)
        return out

    def refine(self, probs_ref: torch.Tensor, probs_main: torch.Tensor) -> torch.Tensor:
        """Return B's refined maps: B*'s at aligned tokens (alpha 1), B's own elsewhere, times the token weights."""
        keys = probs_main.shape[-1]
        cfg = self.config
        mixed = probs_main
        if cfg.mapper is not None:
            mapper = cfg.mapper.to(probs_main.device)
            alphas = (cfg.alphas if cfg.alphas is not None else torch.ones(keys)).to(probs_main)
            if mapper.numel() != keys or alphas.numel() != keys:
                raise ValueError(
                    f"the refine mapping covers {mapper.numel()} tokens but the conditioning has {keys}; "
                    "encode the source and concept prompts with the same text encoder"
                )
            mixed = probs_ref[..., mapper] * alphas + probs_main * (1.0 - alphas)
        if cfg.weights is not None:
            if cfg.weights.numel() != keys:
                raise ValueError(
                    f"the token weights cover {cfg.weights.numel()} tokens but the conditioning has {keys}"
                )
            mixed = mixed * cfg.weights.to(mixed)
        return mixed

    def patch(self, kind: str, prev: Optional[ReplaceFn] = None, decoder: bool = False) -> "AttentionPatch":
        """Return a replace function for one block ('attn1' self, 'attn2' cross) that wraps `prev`.

        `decoder` marks a block of the network's decoder (a UNet's output blocks), where appearance
        attention acts by default.
        """
        if kind not in ("attn1", "attn2"):
            raise ValueError(f"kind must be 'attn1' or 'attn2', got {kind!r}")
        return AttentionPatch(self, kind, prev, decoder)


class AttentionPatch:
    """A replace function registered on one block; calls the controller, composing with the block's previous patch."""

    def __init__(self, controller: AttentionController, kind: str, prev: Optional[ReplaceFn],
                 decoder: bool = False) -> None:
        """Bind a controller to a block kind, the patch that was there before, and whether the block is a decoder's."""
        self.controller, self.kind, self.prev, self.decoder = controller, kind, prev, decoder

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """Return the attention output for this block."""
        if self.kind == "attn1":
            return self.controller.self_attention(q, k, v, extra_options, self.prev, self.decoder)
        return self.controller.cross_attention(q, k, v, extra_options, self.prev)

    def to(self, device) -> "AttentionPatch":
        """Move the wrapped patch (if it holds tensors) to `device`, as hosts do with patches; return self."""
        if hasattr(self.prev, "to"):
            self.prev = self.prev.to(device)
        return self

    def models(self) -> list:
        """Return the models the wrapped patch needs loaded (hosts ask patches this)."""
        return self.prev.models() if hasattr(self.prev, "models") else []
