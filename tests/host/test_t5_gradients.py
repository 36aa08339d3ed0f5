"""ComfyUI's T5 for concept learning (nodes/arch/t5_text.py), on the tiny T5 of comfy_tiny_flow: the
forward with gradients gives ComfyUI's output and reaches the embeddings; concept vectors spliced
into T5's token stream give what ComfyUI's `embedding:NAME` syntax gives."""
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


def test_t5_token_splicing_equals_comfyuis_embedding_syntax(comfy_session, pack, embedding_file):
    t5_text = importlib.import_module(pack.arch.__name__ + ".t5_text")
    clip = flow.tiny_flux_clip(embedding_directory=str(comfy_session.folder("embeddings")))
    vectors = torch.randn(3, flow.TINY_T5_WIDTH, generator=torch.Generator().manual_seed(0))
    embedding_file("vct_t5_concept", vectors, key="t5xxl")
    for before, after in (("", ""), ("a photo of", "on the grass"), ("a red", "")):
        text = f"{before} embedding:vct_t5_concept {after}".strip()
        expected = [tuple(pair[:2]) for pair in clip.tokenize(text)["t5xxl"][0]]
        got = t5_text.t5_spliced_tokens(clip, "t5xxl", before, vectors, after)
        assert len(got) == len(expected), text
        for (g, gw), (e, ew) in zip(got, expected):
            assert gw == ew and type(g) is type(e), text
            assert torch.equal(g, e) if torch.is_tensor(g) else g == e, text
