"""ComfyUI's T5 run with gradients to its input embeddings (nodes/arch/t5_text.py), on the tiny T5 of
comfy_tiny_flow: the same output as ComfyUI's forward, and gradients that reach the embeddings."""
from __future__ import annotations

import importlib

import torch
from support import comfy_tiny_flow as flow


def test_t5_forward_matches_comfyuis_and_backpropagates(comfy_session, pack):
    t5_text = importlib.import_module(pack.arch.__name__ + ".t5_text")
    clip = flow.tiny_flux_clip()
    t5 = clip.cond_stage_model.t5xxl.transformer
    ids = torch.tensor([[71, 1712, 3, 9, 1] + [0] * 11])
    embeds = t5.shared(ids, out_dtype=torch.float32)
    with torch.no_grad():
        expected = t5(None, None, embeds=embeds.clone())[0]
        got = t5_text.t5_forward(t5, embeds)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())
    leaf = embeds.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        t5_text.t5_forward(t5, leaf).pow(2).mean().backward()
    assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all()) and float(leaf.grad.abs().sum()) > 0
    mask = torch.tensor([[1] * 5 + [0] * 11])
    with torch.no_grad():
        expected = t5(None, mask, embeds=embeds.clone())[0]
        got = t5_text.t5_forward(t5, embeds, mask)
    assert torch.allclose(got[:, :5], expected[:, :5], atol=1e-4, rtol=1e-4)
