"""VCT's dual-branch control on the joint attention of rectified-flow transformers (SD3's MMDiT, Flux).

Both families send every joint-attention call through ComfyUI's `optimized_attention` with the
call's transformer options, where ComfyUI calls an `optimized_attention_override` if one is set.
VCT's override finds the text length (the joint sequence is `[text | image]`, image tokens from
2x2 patches of the latent) and hands `[rows, tokens, heads * d]` tensors to the kernel's
`JointAttentionController`; calls without VCT's row roles go to ComfyUI's attention unchanged. The
text encoders' attention passes no transformer options, so it is never touched.

Layouts at the override: SD3 passes q, k as `[rows, L, heads * d]` and v as `[rows, L, heads, d]`,
`heads` by keyword; Flux passes q, k, v as `[rows, heads, L, d]` (RoPE applied) with
`skip_reshape=True`, `heads` positionally. Both expect `[rows, L, heads * d]` back.

The architecture that uses it for SD3 and Flux is mmdit.py.
"""
from __future__ import annotations

import math

from ... import vct_ops

PATCH = 2  # SD3's and Flux's patch side in latent pixels
# Transformer option a block's replace patch sets to the block's key, ("double_block", i) or
# ("single_block", i), when only some blocks take part.
BLOCK_KEY = "vct_joint_block"


def image_tokens(latent_shape, patch: int = PATCH) -> int:
    """Return how many image tokens a latent of `latent_shape` `[rows, C, H, W]` gives (padded to whole patches)."""
    return math.ceil(latent_shape[-2] / patch) * math.ceil(latent_shape[-1] / patch)


def patch_size(model) -> int:
    """Return the model's patch side in latent pixels (2 for SD3 and Flux checkpoints)."""
    size = model.model.model_config.unet_config.get("patch_size", PATCH)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


class JointOverride:
    """ComfyUI's `optimized_attention_override` carrying VCT's joint-attention control, wrapping a previous one."""

    def __init__(self, controller: vct_ops.JointAttentionController, previous=None, blocks=None,
                 patch: int = PATCH) -> None:
        """Bind the run's controller and the override that was set before (called for everything VCT leaves alone);
        with `blocks`, only calls inside those blocks (keys as `joint_block_keys` gives them) are controlled.
        `patch` is the model's patch side, which sets how many of a call's tokens are the image's."""
        self.controller, self.previous, self.patch = controller, previous, patch
        self.blocks = None if blocks is None else frozenset(blocks)

    def _plain(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        """Return the attention output, controlled where the call carries VCT's rows."""
        options = kwargs.get("transformer_options") or {}
        shape = options.get(vct_ops.LATENT_SHAPE_KEY)
        if options.get(vct_ops.ROLES_KEY) is None or shape is None or kwargs.get("mask") is not None:
            return self._plain(func, args, kwargs)
        if self.blocks is not None and options.get(BLOCK_KEY) not in self.blocks:
            return self._plain(func, args, kwargs)
        q, k, v = args[:3]
        heads = kwargs["heads"] if "heads" in kwargs else args[3]
        if kwargs.get("skip_reshape"):  # Flux: [rows, heads, L, d]
            q, k, v = (t.transpose(1, 2).flatten(2) for t in (q, k, v))
        elif v.dim() == 4:  # SD3: v is [rows, L, heads, d]
            v = v.flatten(2)
        text = q.shape[1] - image_tokens(shape, self.patch)

        def attention(q_, k_, v_, heads_, extra):
            # ComfyUI's attention (or the override before ours) for the rows VCT computes fused, in
            # the [rows, L, heads * d] layout; `_inside_attn_wrapper` stays, so it does not call us again.
            rest = {key: value for key, value in kwargs.items() if key not in ("heads", "skip_reshape", "mask")}
            return self._plain(func, (q_, k_, v_), {**rest, "heads": heads_})

        return self.controller.joint_attention(q, k, v, text, {**options, "n_heads": heads}, attention=attention)


def joint_block_keys(model) -> list[tuple[str, int]]:
    """Return the keys ComfyUI's "dit" replace patches use for the model's joint-attention blocks, in order."""
    net = model.model.diffusion_model
    keys = [("double_block", i) for i in range(len(getattr(net, "joint_blocks", getattr(net, "double_blocks", []))))]
    return keys + [("single_block", i) for i in range(len(getattr(net, "single_blocks", [])))]


def _stamping(key, previous):
    def replace(args, extra):
        # The block's attention calls see which block they are in through a copy of the options.
        args = {**args, "transformer_options": {**args["transformer_options"], BLOCK_KEY: key}}
        return previous(args, extra) if previous is not None else extra["original_block"](args)
    return replace


def joint_controlled_clone(model, controller: vct_ops.JointAttentionController, blocks=None):
    """Return a clone of `model` whose joint attention runs under `controller` (in `blocks` only, when given),
    wrapping an override and block patches already set."""
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    # The clone's options are its own copy (ModelPatcher.clone copies model_options), so the
    # original model keeps its override.
    previous = options.get("optimized_attention_override")
    options["optimized_attention_override"] = JointOverride(controller, previous, blocks, patch_size(model))
    if blocks is not None:
        known = joint_block_keys(model)
        unknown = [key for key in blocks if tuple(key) not in known]
        if unknown:
            raise ValueError(f"the model has no joint-attention block {unknown[0]}; its blocks are {known}")
        # Only with a choice of blocks: a patched SD3 block runs under ComfyUI's activation checkpoint.
        registry = options.get("patches_replace", {}).get("dit", {})
        for kind, index in known:
            clone.set_model_patch_replace(_stamping((kind, index), registry.get((kind, index))), "dit", kind, index)
    return clone
