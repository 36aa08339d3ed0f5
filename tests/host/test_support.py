"""Smoke tests of the host-tier harness itself: tiny models, executor, pack loading, UI -> API."""
from __future__ import annotations

import json
import textwrap

import comfy.ldm.modules.attention as attention
import comfy.model_base
import pytest
import torch
from support import comfy_runner, comfy_tiny
from support.comfy_runner import PromptValidationError, run_prompt, ui_to_api, widget_layout

import nodes

LEVEL0_KEYS = {("input", 1, 0), ("output", 2, 0), ("output", 3, 0)}
LEVEL1_KEYS = {("input", 3, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)}


def pytorch_attention(func, *args, **kwargs):
    return attention.attention_pytorch(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------

def test_tiny_unet_behaves_like_sd15(tiny_model):
    m = tiny_model.model
    assert isinstance(m, comfy.model_base.BaseModel) and m.model_type == comfy.model_base.ModelType.EPS
    assert m.latent_format.scale_factor == pytest.approx(0.18215)
    ms = tiny_model.get_model_object("model_sampling")
    assert ms.sigmas.shape == (1000,)
    assert float(ms.sigma_max) == pytest.approx(14.6146, rel=1e-3)
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([8.0, 1.0])
    x = torch.randn(2, 4, 8, 8, generator=g) * sigma.view(-1, 1, 1, 1)
    c1, c2 = torch.randn(2, 1, 77, 64, generator=g)
    with torch.no_grad():
        d1 = m.apply_model(x, sigma, c_crossattn=c1.expand(2, -1, -1))
        d2 = m.apply_model(x, sigma, c_crossattn=c2.expand(2, -1, -1))
    assert d1.shape == x.shape and torch.isfinite(d1).all()
    assert d1.std(dim=(1, 2, 3)).min() > 1e-2                      # not constant
    rel = (d1 - d2).norm() / d1.norm()
    assert rel > 1e-2, f"conditioning has too little influence ({rel:.2e})"


def test_tiny_unet_is_deterministic_and_fully_initialised():
    a, b = comfy_tiny.tiny_sd15_model(seed=3), comfy_tiny.tiny_sd15_model(seed=3)
    for (n, p), q in zip(a.model.diffusion_model.named_parameters(), b.model.diffusion_model.parameters()):
        assert torch.equal(p, q), n
        assert torch.isfinite(p).all(), n
    norms = [mod.weight for mod in a.model.diffusion_model.modules() if isinstance(mod, torch.nn.GroupNorm)]
    assert norms and all(bool((w == 1).all()) for w in norms)


def test_tiny_unet_attention_layout(tiny_model):
    """The docstring of tiny_sd15_model: keys, query tokens per level, heads, context length."""
    seen = {}

    def recorder(kind):
        def fn(q, k, v, extra):
            seen[(kind, extra["block"] + (extra["block_index"],))] = (q.shape[1], k.shape[1], extra["n_heads"],
                                                                       extra["dim_head"])
            return attention.optimized_attention(q, k, v, extra["n_heads"])
        return fn

    patched = tiny_model.clone()
    for key in LEVEL0_KEYS | LEVEL1_KEYS:
        patched.set_model_attn1_replace(recorder("attn1"), *key)
        patched.set_model_attn2_replace(recorder("attn2"), *key)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        patched.model.apply_model(x, torch.tensor([1.0]), c_crossattn=torch.randn(1, 77, 64),
                                  transformer_options=patched.model_options["transformer_options"])
    assert {k for _, k in seen} == LEVEL0_KEYS | LEVEL1_KEYS
    for (kind, key), (nq, nk, heads, dim_head) in seen.items():
        level0 = key in LEVEL0_KEYS
        assert nq == (64 if level0 else 16)
        assert nk == (nq if kind == "attn1" else 77)
        assert (heads, dim_head) == ((2, 16) if level0 else (2, 32))
    assert "patches_replace" not in tiny_model.model_options.get("transformer_options", {})


def test_tiny_clip_encodes_prompts(tiny_clip):
    tokens = tiny_clip.tokenize("a photo of a cat")
    assert list(tokens) == ["l"] and len(tokens["l"][0]) == 77
    cond, pooled = tiny_clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, comfy_tiny.TINY_CLIP_WIDTH) and pooled.shape == (1, comfy_tiny.TINY_CLIP_WIDTH)
    assert torch.isfinite(cond).all()
    other = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a painting of a dog"))
    assert (cond - other).abs().max() > 1e-2
    # longer prompts: one 77-token chunk per 75 tokens, concatenated
    long = tiny_clip.encode_from_tokens(tiny_clip.tokenize(" ".join(["cat"] * 80)))
    assert long.shape == (1, 154, comfy_tiny.TINY_CLIP_WIDTH)


def test_embedding_file_is_loaded_at_n_positions(tiny_clip, embedding_file):
    n = 3
    vecs = torch.randn(n, comfy_tiny.TINY_CLIP_WIDTH, generator=torch.Generator().manual_seed(1))
    embedding_file("vct_harness_concept", vecs)
    row = tiny_clip.tokenize("a photo of embedding:vct_harness_concept")["l"][0]
    positions = [i for i, (t, _) in enumerate(row) if torch.is_tensor(t)]
    assert positions == [4, 5, 6]                                   # <start> a photo of | v0 v1 v2 | <end>
    assert torch.equal(torch.stack([row[i][0] for i in positions]), vecs)

    # the same prompt with ordinary tokens in those slots: input embeddings differ exactly there
    plain_row = [(320, w) if torch.is_tensor(t) else (t, w) for t, w in row]
    enc = tiny_clip.cond_stage_model.clip_l
    e_emb, *_ = enc.process_tokens([[t for t, _ in row]], torch.device("cpu"))
    e_plain, *_ = enc.process_tokens([[t for t, _ in plain_row]], torch.device("cpu"))
    changed = ((e_emb - e_plain).abs().amax(dim=-1)[0] > 0).nonzero().flatten().tolist()
    assert changed == positions
    # the conditioning (causal CLIP): unchanged before the embedding, changed from there on
    c_emb = tiny_clip.encode_from_tokens({"l": [row]})
    c_plain = tiny_clip.encode_from_tokens({"l": [plain_row]})
    diff = (c_emb - c_plain).abs().amax(dim=-1)[0]
    assert diff[: positions[0]].max() == 0
    assert (diff[positions] > 0).all()


def test_embedding_of_wrong_width_is_silently_dropped(tiny_clip, embedding_file):
    """ComfyUI fact (DESIGN.md section 3): a width mismatch is only logged."""
    embedding_file("vct_harness_wide", torch.randn(2, 768))
    with_emb = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a photo of embedding:vct_harness_wide"))
    without = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a photo of"))
    assert torch.equal(with_emb, without)


def test_tiny_vae_round_trip_shapes(tiny_vae):
    assert tiny_vae.downscale_ratio == 8 and tiny_vae.latent_channels == 4
    img = torch.rand(2, 32, 32, 3)
    with torch.inference_mode():
        z = tiny_vae.encode(img)
    assert z.shape == (2, 4, 4, 4) and torch.isfinite(z).all()
    with torch.inference_mode():
        out = tiny_vae.decode(z)
    assert out.shape == (2, 32, 32, 3) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_gradient_paths_on_tiny_models(tiny_model, tiny_clip):
    """The paths a training node can use (see probe_comfy_autograd.py for the failing ones)."""
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(1, 77, 64, generator=g, requires_grad=True)
    tiny_model.model.requires_grad_(False)
    out = tiny_model.model.apply_model(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([2.0]), c_crossattn=ctx,
                                       transformer_options={"optimized_attention_override": pytorch_attention})
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert ctx.grad is not None and ctx.grad.norm() > 0

    enc = tiny_clip.cond_stage_model.clip_l
    vec = torch.randn(2, 64, generator=g, requires_grad=True)
    row = [t for t, _ in tiny_clip.tokenize("a photo")["l"][0]]
    row = row[:1] + [vec[0], vec[1]] + row[1:-2]
    embeds, _, num_tokens, _ = enc.process_tokens([row], torch.device("cpu"))
    assert embeds.requires_grad
    with pytest.raises(RuntimeError, match="inplace operation"):   # comfy/clip_model.py CLIPLayer: x += ...
        z = enc.transformer(None, None, embeds=embeds, num_tokens=num_tokens, intermediate_output=None,
                            final_layer_norm_intermediate=True, dtype=torch.float32)[0]
        (z * torch.randn(z.shape, generator=g)).sum().backward()


# ----------------------------------------------------------------------------------------------
# the executor
# ----------------------------------------------------------------------------------------------

def core_prompt(ckpt_name: str, steps: int = 2, prefix: str = "vct_harness") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": 0, "steps": steps, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_core_prompt_runs_in_executor(tiny_checkpoint, comfy_session):
    from PIL import Image

    result = run_prompt(core_prompt(tiny_checkpoint.name))
    assert result.success and not result.interrupted
    files = result.output_files("7")
    assert len(files) == 1 and files[0].is_file()
    assert files[0].parent == comfy_session.output_dir and files[0].suffix == ".png"
    assert Image.open(files[0]).size == (64, 64)
    # the real loader node ran, inside inference mode, with the real embeddings folder
    call = tiny_checkpoint.calls[0]
    assert call["inference_mode"] is True
    assert call["embedding_directory"] == [str(comfy_session.folder("embeddings"))]
    assert [v for n, v, _ in result.server.progress if n == "5"] == [1, 2]
    assert any(e == "execution_success" for e, _ in result.status_messages)


def test_invalid_prompt_raises_with_node_errors(tiny_checkpoint):
    prompt = core_prompt("no_such_checkpoint.safetensors")
    with pytest.raises(PromptValidationError, match="ckpt_name") as info:
        run_prompt(prompt)
    assert "1" in info.value.node_errors


def test_load_image_encode_decode(tiny_checkpoint, input_image):
    input_image("vct_harness_source.png", width=40, height=48)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "vct_harness_source.png"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                     "width": 32, "height": 32, "crop": "center"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    comfy_runner.set_inputs(prompt, "ImageScale", width=64)
    files = run_prompt(prompt).output_files("6")
    assert len(files) == 1 and files[0].is_file() and files[0].parent.name == "temp"


def test_type_mismatch_fails_validation(tiny_checkpoint):
    bad = core_prompt(tiny_checkpoint.name)
    bad["5"]["inputs"]["latent_image"] = ["2", 0]                   # CONDITIONING where LATENT is expected
    with pytest.raises(PromptValidationError, match="latent_image"):
        run_prompt(bad)


def test_interrupt_is_reported(tiny_checkpoint):
    result = run_prompt(core_prompt(tiny_checkpoint.name, steps=3), interrupt_at_progress=2)
    assert result.interrupted and not result.success and "7" not in result.outputs
    assert [v for n, v, _ in result.server.progress if n == "5"] == [1]


# ----------------------------------------------------------------------------------------------
# UI -> API conversion and pack loading
# ----------------------------------------------------------------------------------------------

def core_ui_workflow(ckpt_name: str) -> dict:
    """What the frontend saves for core_prompt(), plus a Reroute and a PrimitiveNode driving `steps`."""
    def node(id_, type_, widgets=None, inputs=(), mode=0):
        return {"id": id_, "type": type_, "mode": mode, "widgets_values": widgets,
                "inputs": [{"name": n, "type": t, "link": lk, **({"widget": {"name": n}} if w else {})}
                           for n, t, lk, w in inputs]}
    return {
        "last_node_id": 11, "last_link_id": 12, "version": 0.4,
        "nodes": [
            node(1, "CheckpointLoaderSimple", [ckpt_name]),
            node(2, "CLIPTextEncode", ["a photo of a cat"], [("clip", "CLIP", 1, False)]),
            node(3, "CLIPTextEncode", [""], [("clip", "CLIP", 2, False)]),
            node(4, "EmptyLatentImage", [64, 64, 1]),
            node(5, "KSampler", [0, "randomize", 20, 7.5, "euler", "normal", 1],
                 [("model", "MODEL", 3, False), ("positive", "CONDITIONING", 4, False),
                  ("negative", "CONDITIONING", 5, False), ("latent_image", "LATENT", 6, False),
                  ("steps", "INT", 11, True)]),
            node(6, "VAEDecode", None, [("samples", "LATENT", 7, False), ("vae", "VAE", 12, False)]),
            node(7, "SaveImage", ["vct_ui"], [("images", "IMAGE", 9, False)]),
            node(8, "Note", ["just a note"]),
            node(9, "Reroute", None, [("", "*", 10, False)]),
            node(10, "PrimitiveNode", [2, "fixed"]),
        ],
        "links": [[1, 1, 1, 2, 0, "CLIP"], [2, 1, 1, 3, 0, "CLIP"], [3, 1, 0, 5, 0, "MODEL"],
                  [4, 2, 0, 5, 1, "CONDITIONING"], [5, 3, 0, 5, 2, "CONDITIONING"], [6, 4, 0, 5, 3, "LATENT"],
                  [7, 5, 0, 6, 0, "LATENT"], [9, 6, 0, 7, 0, "IMAGE"], [10, 1, 2, 9, 0, "VAE"],
                  [11, 10, 0, 5, 4, "INT"], [12, 9, 0, 6, 1, "VAE"]],
    }


def test_ui_to_api_core_nodes(tiny_checkpoint):
    api = ui_to_api(core_ui_workflow(tiny_checkpoint.name))
    expected = core_prompt(tiny_checkpoint.name, steps=2, prefix="vct_ui")
    assert {k: v["inputs"] for k, v in api.items()} == {k: v["inputs"] for k, v in expected.items()}
    assert {k: v["class_type"] for k, v in api.items()} == {k: v["class_type"] for k, v in expected.items()}
    assert run_prompt(api).output_files("7")[0].name.startswith("vct_ui")


def test_widget_layout_extras():
    ks = widget_layout("KSampler")
    assert [w["name"] for w in ks] == ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert [w["control"] for w in ks] == [True] + [False] * 5
    li = widget_layout("LoadImage")
    assert li[0]["name"] == "image" and li[0]["upload"]
    # a template saved by the frontend: ['file.png', 'image'] (the upload button's value)
    assert comfy_runner._assign_widget_values("LoadImage", ["file.png", "image"]) == {"image": "file.png"}
    # older saves without the control value
    assert comfy_runner._assign_widget_values("KSampler", [5, 20, 8, "euler", "normal", 1])["steps"] == 20


V3_PACK = '''
from comfy_api.latest import ComfyExtension, io


class HarnessLatentShift(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VCTHarnessLatentShift", display_name="Harness Latent Shift", category="testing",
            inputs=[
                io.Latent.Input("latent"),
                io.Float.Input("amount", default=1.0, min=-10.0, max=10.0),
                io.Combo.Input("mode", options=["add", "mul"]),
                io.Int.Input("seed", default=0, min=0, max=2**31, control_after_generate=True),
                io.String.Input("note", optional=True, default=""),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, latent, amount, mode, seed, note=""):
        s = latent["samples"]
        s = s + amount if mode == "add" else s * amount
        return io.NodeOutput({"samples": s})


class HarnessLatentMean(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="VCTHarnessLatentMean", category="testing", is_output_node=True,
                         inputs=[io.Latent.Input("latent")], outputs=[])

    @classmethod
    def execute(cls, latent):
        return io.NodeOutput(ui={"mean": [float(latent["samples"].mean())]})


class HarnessRaise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="VCTHarnessRaise", category="testing", is_output_node=True,
                         inputs=[io.String.Input("message", default="boom")], outputs=[])

    @classmethod
    def execute(cls, message):
        raise ValueError(message)


class HarnessExtension(ComfyExtension):
    async def get_node_list(self):
        return [HarnessLatentShift, HarnessLatentMean, HarnessRaise]


async def comfy_entrypoint():
    return HarnessExtension()
'''


@pytest.fixture(scope="module")
def harness_pack(tmp_path_factory):
    src = tmp_path_factory.mktemp("packsrc") / "VCTHarnessPack"
    src.mkdir()
    (src / "__init__.py").write_text(textwrap.dedent(V3_PACK))
    return comfy_runner.load_pack(src, name="VCTHarnessPack")


def test_v3_pack_loads_and_ui_workflow_runs(harness_pack):
    assert harness_pack.node_ids == ["VCTHarnessLatentMean", "VCTHarnessLatentShift", "VCTHarnessRaise"]
    assert harness_pack.path.name == "VCTHarnessPack" and harness_pack.module is not None
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["VCTHarnessLatentShift"] == "Harness Latent Shift"
    assert [w["name"] for w in widget_layout("VCTHarnessLatentShift")] == ["amount", "mode", "seed", "note"]
    workflow = {
        "nodes": [
            {"id": 1, "type": "EmptyLatentImage", "widgets_values": [16, 16, 1]},
            {"id": 2, "type": "VCTHarnessLatentShift", "widgets_values": [2.5, "add", 7, "fixed", "hi"],
             "inputs": [{"name": "latent", "type": "LATENT", "link": 1}]},
            {"id": 3, "type": "VCTHarnessLatentMean", "widgets_values": [],
             "inputs": [{"name": "latent", "type": "LATENT", "link": 2}]},
        ],
        "links": [{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "LATENT"},
                  {"id": 2, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 0, "type": "LATENT"}],
    }
    api = ui_to_api(json.loads(json.dumps(workflow)))
    assert api["2"]["inputs"] == {"amount": 2.5, "mode": "add", "seed": 7, "note": "hi", "latent": ["1", 0]}
    result = run_prompt(api)
    assert result.outputs["3"]["mean"] == [pytest.approx(2.5)]


def test_node_exception_is_reported(harness_pack):
    prompt = {"1": {"class_type": "VCTHarnessRaise", "inputs": {"message": "boom from a node"}}}
    with pytest.raises(comfy_runner.PromptExecutionError, match="ValueError: boom from a node"):
        run_prompt(prompt)
    result = run_prompt(prompt, raise_on_error=False)
    assert not result.success and result.error["node_id"] == "1"


def test_load_pack_reports_import_errors(tmp_path):
    src = tmp_path / "BrokenPack"
    src.mkdir()
    (src / "__init__.py").write_text("raise ImportError('boom from the pack')\n")
    with pytest.raises(comfy_runner.PackLoadError, match="boom from the pack"):
        comfy_runner.load_pack(src, name="VCTBrokenPack")
