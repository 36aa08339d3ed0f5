"""Small torch networks for the core tier: a UNet-like denoiser with real self- and
cross-attention layers that honour ComfyUI's attention-replace contract, a tiny text encoder,
and the exact denoiser of Gaussian data."""
from __future__ import annotations

import math

import torch
from torch import nn

import vct_ops


def init_like_design(module: nn.Module) -> nn.Module:
    """Return `module` with kaiming-uniform weights, zero biases and unit norm weights (DESIGN.md section 4)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class Attention(nn.Module):
    """q/k/v projections around ComfyUI's replace-function contract."""

    def __init__(self, dim: int, context_dim: int, heads: int, key: tuple, kind: str) -> None:
        super().__init__()
        self.heads, self.key, self.kind = heads, key, kind
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context, options: dict, shape: list, qk_input=None):
        ctx = x if self.kind == "attn1" else context
        qk = x if qk_input is None else qk_input
        q, k, v = self.to_q(qk), self.to_k(qk if self.kind == "attn1" else ctx), self.to_v(ctx)
        extra = {name: value for name, value in options.items() if name not in ("patches_replace",)}
        extra.update(
            n_heads=self.heads,
            dim_head=q.shape[-1] // self.heads,
            block=self.key[:2],
            block_index=self.key[2],
            activations_shape=shape,
        )
        patch = options.get("patches_replace", {}).get(self.kind, {}).get(self.key)
        out = patch(q, k, v, extra) if patch is not None else vct_ops.sdpa_attention(q, k, v, self.heads)
        return self.to_out(out)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention and a feed-forward layer over the spatial tokens."""

    def __init__(self, channels: int, context_dim: int, heads: int, key: tuple, prompt_via_maps: bool = False) -> None:
        super().__init__()
        self.prompt_via_maps = prompt_via_maps
        self.norm_in = nn.GroupNorm(4, channels)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))
        self.attn1 = Attention(channels, channels, heads, key, "attn1")
        self.attn2 = Attention(channels, context_dim, heads, key, "attn2")
        self.ff = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, h, context, options):
        b, c, hh, ww = h.shape
        shape = [b, c, hh, ww]
        t = self.norm_in(h).flatten(2).transpose(1, 2)
        if self.prompt_via_maps:
            # The prompt only steers where self-attention looks (its queries and keys); the values,
            # and so the content that gets moved around, come from the latent alone.
            steer = self.attn2(self.norm2(t), context, options, shape)
            t = t + self.attn1(self.norm1(t), None, options, shape, qk_input=self.norm1(t + steer))
        else:
            t = t + self.attn1(self.norm1(t), None, options, shape)
            t = t + self.attn2(self.norm2(t), context, options, shape)
        t = t + self.ff(self.norm3(t))
        return h + t.transpose(1, 2).reshape(b, c, hh, ww)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h, emb):
        r = self.conv1(torch.nn.functional.silu(self.norm1(h))) + self.emb(emb)[:, :, None, None]
        r = self.conv2(torch.nn.functional.silu(self.norm2(r)))
        return self.skip(h) + r / math.sqrt(2.0)


class TinyUNet(nn.Module):
    """Two resolution levels with attention at both, keyed like ComfyUI's SD UNet blocks."""

    def __init__(self, channels: int = 32, context_dim: int = 64, heads: int = 4, latent_channels: int = 4,
                 prompt_via_maps: bool = False):
        super().__init__()
        block = lambda key: TransformerBlock(channels, context_dim, heads, key, prompt_via_maps)  # noqa: E731
        self.temb = 32
        self.time_mlp = nn.Sequential(nn.Linear(self.temb, self.temb), nn.SiLU(), nn.Linear(self.temb, self.temb))
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.res_in = ResBlock(channels, channels, self.temb)
        self.attn_in = block(("input", 1, 0))
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.res_low = ResBlock(channels, channels, self.temb)
        self.attn_low = block(("input", 4, 0))
        self.attn_mid = block(("middle", 0, 0))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.res_out = ResBlock(2 * channels, channels, self.temb)
        self.attn_out = block(("output", 3, 0))
        self.norm_out = nn.GroupNorm(4, channels)
        self.conv_out = nn.Conv2d(channels, latent_channels, 3, padding=1)

    def time_embedding(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.temb // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=sigma.device) / half)
        arg = sigma.log()[:, None] * freqs[None]
        return self.time_mlp(torch.cat([arg.sin(), arg.cos()], dim=-1))

    def forward(self, x, sigma, context, options=None):
        options = dict(options or {})
        options["original_shape"] = list(x.shape)
        emb = self.time_embedding(sigma)
        h0 = self.attn_in(self.res_in(self.conv_in(x), emb), context, options)
        h1 = self.attn_low(self.res_low(self.down(h0), emb), context, options)
        h1 = self.attn_mid(h1, context, options)
        h = torch.cat([self.up(h1), h0], dim=1)
        h = self.attn_out(self.res_out(h, emb), context, options)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class EpsDenoiser:
    """Wraps an eps-predicting network in the kernel's denoiser contract, as ComfyUI's model sampling does."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, x, sigma, cond, transformer_options=None):
        s = sigma.view(-1, 1, 1, 1)
        eps = self.net(x / (1.0 + s * s).sqrt(), sigma, cond, transformer_options)
        return x - s * eps


class TinyTextEncoder(nn.Module):
    """Token vectors -> conditioning: [start, vectors..., end, padding] through one attention layer."""

    def __init__(self, width: int = 64, length: int = 32, vocab: int = 16) -> None:
        super().__init__()
        self.length = length
        self.embedding = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.1)
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.start, self.end = 0, 1

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        start = self.embedding.weight[self.start][None]
        end = self.embedding.weight[self.end][None]
        pad = end.expand(self.length - 2 - vectors.shape[0], -1)
        seq = torch.cat([start, vectors, end, pad]) + self.position
        return self.layer(seq[None])

    def words(self, ids: list[int]) -> torch.Tensor:
        return self.embedding.weight[torch.tensor(ids)]


class GaussianDenoiser:
    """The exact denoiser of data ~ N(mean, std^2) per element; its probability-flow ODE has a closed form."""

    def __init__(self, mean: float = 0.5, std: float = 0.8) -> None:
        self.mean, self.var = mean, std * std

    def __call__(self, x, sigma, cond, transformer_options=None):
        s2 = sigma.view(-1, 1, 1, 1).to(x) ** 2
        return self.mean + self.var / (self.var + s2) * (x - self.mean)

    def flow(self, x0: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """Return the exact ODE solution moved from `sigma_from` to `sigma_to`."""
        ratio = math.sqrt((self.var + sigma_to**2) / (self.var + sigma_from**2))
        return self.mean + (x0 - self.mean) * ratio


def sd_train_sigmas() -> torch.Tensor:
    """Return SD's 1000 training sigmas, float32."""
    return vct_ops.alphas_cumprod_to_sigmas(vct_ops.scaled_linear_alphas_cumprod()).float()


def tiny_denoiser(seed: int = 0, prompt_via_maps: bool = False) -> EpsDenoiser:
    """Return a seeded tiny UNet denoiser initialised as DESIGN.md section 4 describes."""
    torch.manual_seed(seed)
    return EpsDenoiser(frozen(init_like_design(TinyUNet(prompt_via_maps=prompt_via_maps))))


def frozen(net: nn.Module) -> nn.Module:
    """Return `net` in eval mode with no parameter requiring gradients."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


# ----------------------------------------------------------------------------------------------
# A joint-attention transformer (the MM-DiT layout of SD3 and Flux) on the flow ODE
# ----------------------------------------------------------------------------------------------

JOINT_HOOK = "joint_attention"  # transformer option: fn(q, k, v, text, extra) -> out, as the glue installs it


class JointBlock(nn.Module):
    """Text and image streams with their own projections, one attention over `[text | image]`."""

    def __init__(self, dim: int, heads: int, index: int, prompt_via_maps: bool = False) -> None:
        super().__init__()
        self.heads, self.index, self.prompt_via_maps = heads, index, prompt_via_maps
        self.norm_txt, self.norm_img = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv_txt, self.qkv_img = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.out_txt, self.out_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp_img = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mlp_txt = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, txt, img, emb, options):
        text = txt.shape[1]
        qkv = torch.cat([self.qkv_txt(self.norm_txt(txt + emb)), self.qkv_img(self.norm_img(img + emb))], dim=1)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.prompt_via_maps:
            # The prompt only steers where the image looks (its queries and keys); the values, and
            # so the content moved around, come from the image alone.
            steered = self.qkv_img(self.norm_img(img + emb + txt.mean(dim=1, keepdim=True)))
            q_img, k_img, _ = steered.chunk(3, dim=-1)
            q = torch.cat([q[:, :text], q_img], dim=1)
            k = torch.cat([k[:, :text], k_img], dim=1)
            v = torch.cat([torch.zeros_like(v[:, :text]), v[:, text:]], dim=1)
        hook = options.get(JOINT_HOOK)
        if hook is not None:
            extra = {name: value for name, value in options.items() if name != JOINT_HOOK}
            extra.update(n_heads=self.heads, block_index=self.index)
            out = hook(q, k, v, text, extra)
        else:
            out = vct_ops.sdpa_attention(q, k, v, self.heads)
        txt = txt + self.out_txt(out[:, :text])
        img = img + self.out_img(out[:, text:])
        return txt + self.mlp_txt(txt), img + self.mlp_img(img)


class TinyJointDiT(nn.Module):
    """Patchified latent (2x2) and text tokens through joint blocks; predicts the flow velocity."""

    def __init__(self, dim: int = 32, context_dim: int = 64, heads: int = 4, depth: int = 2,
                 latent_channels: int = 4, prompt_via_maps: bool = False) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.img_in = nn.Linear(4 * latent_channels, dim)
        self.txt_in = nn.Linear(context_dim, dim)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.position = nn.Parameter(torch.randn(64, dim) * 0.5)
        self.blocks = nn.ModuleList(JointBlock(dim, heads, i, prompt_via_maps) for i in range(depth))
        self.img_out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * latent_channels))

    def forward(self, x, sigma, context, options=None):
        options = dict(options or {})
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        img = self.img_in(tokens) + self.position[: tokens.shape[1]]
        half = img.shape[-1] // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=x.device) / half)
        arg = 1000.0 * sigma[:, None] * freqs[None]
        emb = self.time_mlp(torch.cat([arg.sin(), arg.cos()], dim=-1))[:, None]
        txt = self.txt_in(context)
        for block in self.blocks:
            txt, img = block(txt, img, emb, options)
        out = self.img_out(img).reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


class FlowDenoiser:
    """Wraps a velocity-predicting network in the kernel's contract, as ComfyUI's CONST sampling does."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, x, sigma, cond, transformer_options=None):
        return x - sigma.view(-1, 1, 1, 1) * self.net(x, sigma, cond, transformer_options)


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """Return a shifted flow schedule (ComfyUI's ModelSamplingDiscreteFlow, shift 3 as SD3), descending; the
    last step repeats the smallest sigma, as the DDIM schedule does."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    sigmas = shift * t / (1 + (shift - 1) * t)
    return torch.cat([sigmas, sigmas[-1:]]).float()


def tiny_flow_denoiser(seed: int = 0, prompt_via_maps: bool = False) -> FlowDenoiser:
    """Return a seeded tiny joint-attention flow denoiser."""
    torch.manual_seed(seed)
    return FlowDenoiser(frozen(init_like_design(TinyJointDiT(prompt_via_maps=prompt_via_maps))))
