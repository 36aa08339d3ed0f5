"""The tiny SD2.x and SDXL models of comfy_tiny: model types, conditioning, attention layout,
text encoders, embeddings, and family-marked tiny checkpoints run through the real executor."""
from __future__ import annotations

import json

import comfy.ldm.modules.attention as attention
import comfy.model_base
import comfy.model_sampling
import comfy.sd
import pytest
import safetensors.torch
import torch
from support import comfy_tiny, comfy_tiny_checkpoint
from support.comfy_runner import run_prompt

ModelType = comfy.model_base.ModelType

# attention keys (block_name, block_id, index in the transformer) -> query-token divisor of H*W
SD2_KEYS = {("input", 1, 0): 1, ("output", 2, 0): 1, ("output", 3, 0): 1,
            ("input", 3, 0): 4, ("middle", 0, 0): 4, ("output", 0, 0): 4, ("output", 1, 0): 4}
SDXL_KEYS = {("input", 3, 0): 4, ("output", 2, 0): 4, ("output", 3, 0): 4,
             ("input", 5, 0): 16, ("middle", 0, 0): 16, ("output", 0, 0): 16, ("output", 1, 0): 16}


@pytest.fixture
def embeddings_dir(comfy_session):
    return comfy_session.folder("embeddings")


@pytest.fixture
def write_embedding(embeddings_dir):
    """Factory: write_embedding(name, {key: tensor, ...}) -> path (several keys in one file)."""
    written = []

    def make(name, tensors):
        path = embeddings_dir / f"{name}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        written.append(path)
        return path

    yield make
    for p in written:
        p.unlink(missing_ok=True)


def model_conds(patcher, cond, pooled, x):
    """What the sampler builds from a CLIPTextEncode output: `extra_conds` -> COND objects -> tensors."""
    h, w = x.shape[2] * 8, x.shape[3] * 8
    conds = patcher.model.extra_conds(cross_attn=cond, pooled_output=pooled, width=w, height=h,
                                      device=torch.device("cpu"), noise=x)
    return {k: v.cond for k, v in conds.items()}


def denoise(patcher, clip, text, x, sigma):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    kw = model_conds(patcher, cond, pooled, x)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, **kw), kw


def check_prompt_dependent_output(patcher, clip, expect_y: int | None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g) * 3.0
    sigma = torch.tensor([3.0])
    d1, kw = denoise(patcher, clip, "a photo of a cat", x, sigma)
    d2, _ = denoise(patcher, clip, "a watercolor painting of a mountain lake", x, sigma)
    if expect_y is None:
        assert set(kw) == {"c_crossattn"}
    else:
        assert set(kw) == {"c_crossattn", "y"} and kw["y"].shape == (1, expect_y)
    assert d1.shape == x.shape and torch.isfinite(d1).all() and torch.isfinite(d2).all()
    assert d1.std() > 1e-2
    rel = (d1 - d2).norm() / d1.norm()
    assert rel > 1e-2, f"prompt has too little influence ({rel:.2e})"


# ----------------------------------------------------------------------------------------------
# SD2.x
# ----------------------------------------------------------------------------------------------

def test_sd2_model_types_and_sampling():
    v = comfy_tiny.tiny_sd2_model()
    assert type(v.model) is comfy.model_base.BaseModel and v.model.model_type == ModelType.V_PREDICTION
    assert isinstance(v.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert v.model.latent_format.scale_factor == pytest.approx(0.18215)
    assert v.model.model_config.unet_config["use_linear_in_transformer"] is True
    eps = comfy_tiny.tiny_sd2_model(v_prediction=False)
    assert eps.model.model_type == ModelType.EPS
    assert isinstance(eps.get_model_object("model_sampling"), comfy.model_sampling.EPS)
    # linear proj_in (SD2) rather than SD1's 1x1 conv
    st = v.model.diffusion_model.input_blocks[1][1]
    assert isinstance(st.proj_in, torch.nn.Linear)


def test_sd2_clip_shapes(embeddings_dir):
    clip = comfy_tiny.tiny_sd2_clip(str(embeddings_dir))
    tokens = clip.tokenize("a photo of a cat")
    assert list(tokens) == ["h"] and len(tokens["h"][0]) == 77
    assert tokens["h"][0][-1][0] == 0                                # SD2 pads with 0
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, comfy_tiny.TINY_SD2_CLIP_WIDTH) and pooled.shape == (1, comfy_tiny.TINY_SD2_CLIP_WIDTH)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()


def test_sd2_apply_model_depends_on_prompt(embeddings_dir):
    check_prompt_dependent_output(comfy_tiny.tiny_sd2_model(), comfy_tiny.tiny_sd2_clip(str(embeddings_dir)), None)


def test_sd2_embedding_changes_conditioning(embeddings_dir, write_embedding):
    clip = comfy_tiny.tiny_sd2_clip(str(embeddings_dir))
    vecs = torch.randn(2, comfy_tiny.TINY_SD2_CLIP_WIDTH, generator=torch.Generator().manual_seed(4))
    write_embedding("vct_sd2_concept", {"clip_h": vecs})
    row = clip.tokenize("a photo of embedding:vct_sd2_concept")["h"][0]
    positions = [i for i, (t, _) in enumerate(row) if torch.is_tensor(t)]
    assert positions == [4, 5] and torch.equal(torch.stack([row[i][0] for i in positions]), vecs)
    plain_row = [(320, w) if torch.is_tensor(t) else (t, w) for t, w in row]
    diff = (clip.encode_from_tokens({"h": [row]}) - clip.encode_from_tokens({"h": [plain_row]})).abs().amax(-1)[0]
    assert diff[:4].max() == 0 and (diff[positions] > 1e-3).all()


# ----------------------------------------------------------------------------------------------
# SDXL
# ----------------------------------------------------------------------------------------------

def test_sdxl_model_type_and_layout():
    m = comfy_tiny.tiny_sdxl_model()
    assert isinstance(m.model, comfy.model_base.SDXL) and m.model.model_type == ModelType.EPS
    assert m.model.latent_format.scale_factor == pytest.approx(0.13025)
    cfg = m.model.model_config.unet_config
    assert cfg["context_dim"] == comfy_tiny.TINY_SDXL_CONTEXT_DIM == 96
    assert cfg["adm_in_channels"] == comfy_tiny.TINY_SDXL_ADM_CHANNELS == 64 + 6 * 256
    assert m.model.diffusion_model.label_emb[0][0].in_features == comfy_tiny.TINY_SDXL_ADM_CHANNELS


def test_sdxl_clip_shapes(embeddings_dir):
    clip = comfy_tiny.tiny_sdxl_clip(str(embeddings_dir))
    tokens = clip.tokenize("a photo of a cat")
    assert set(tokens) == {"g", "l"} and len(tokens["g"][0]) == len(tokens["l"][0]) == 77
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, 96) and pooled.shape == (1, comfy_tiny.TINY_SDXL_CLIP_G_WIDTH)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
    other, other_pooled = clip.encode_from_tokens(clip.tokenize("a dog"), return_pooled=True)
    assert (cond - other)[..., :32].abs().max() > 1e-3 and (cond - other)[..., 32:].abs().max() > 1e-3
    assert (pooled - other_pooled).abs().max() > 1e-3


def test_sdxl_apply_model_depends_on_prompt(embeddings_dir):
    check_prompt_dependent_output(comfy_tiny.tiny_sdxl_model(), comfy_tiny.tiny_sdxl_clip(str(embeddings_dir)),
                                  comfy_tiny.TINY_SDXL_ADM_CHANNELS)


def test_sdxl_y_depends_on_pooled_and_size(embeddings_dir):
    m = comfy_tiny.tiny_sdxl_model()
    pooled = torch.randn(1, comfy_tiny.TINY_SDXL_CLIP_G_WIDTH)
    x = torch.zeros(1, 4, 8, 8)
    cond = torch.zeros(1, 77, 96)
    y1 = model_conds(m, cond, pooled, x)["y"]
    assert torch.equal(y1[:, :64], pooled)
    y2 = m.model.extra_conds(cross_attn=cond, pooled_output=pooled, width=1024, height=1024,
                             device=torch.device("cpu"), noise=x)["y"].cond
    assert torch.equal(y1[:, :64], y2[:, :64]) and not torch.equal(y1[:, 64:], y2[:, 64:])


def test_sdxl_embedding_changes_both_encoders(embeddings_dir, write_embedding):
    clip = comfy_tiny.tiny_sdxl_clip(str(embeddings_dir))
    g = torch.Generator().manual_seed(5)
    vl, vg = torch.randn(2, 32, generator=g), torch.randn(2, 64, generator=g)
    write_embedding("vct_sdxl_concept", {"clip_l": vl, "clip_g": vg})
    tokens = clip.tokenize("a photo of embedding:vct_sdxl_concept")
    for key, vecs in (("l", vl), ("g", vg)):
        row = tokens[key][0]
        positions = [i for i, (t, _) in enumerate(row) if torch.is_tensor(t)]
        assert positions == [4, 5] and torch.equal(torch.stack([row[i][0] for i in positions]), vecs)
    plain = {k: [[(320, w) if torch.is_tensor(t) else (t, w) for t, w in rows[0]]] for k, rows in tokens.items()}
    c_emb, p_emb = clip.encode_from_tokens(tokens, return_pooled=True)
    c_plain, p_plain = clip.encode_from_tokens(plain, return_pooled=True)
    diff = (c_emb - c_plain).abs()
    for half in (diff[..., :32], diff[..., 32:]):                  # clip_l part, clip_g part
        d = half.amax(-1)[0]
        assert d[:4].max() == 0 and (d[4:6] > 1e-3).all()
    assert (p_emb - p_plain).abs().max() > 1e-3                    # pooled is read after the embedding


# ----------------------------------------------------------------------------------------------
# attention layout (the docstrings of tiny_sd2_model / tiny_sdxl_model)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_attention_layout(family):
    model = comfy_tiny_checkpoint.TINY_FAMILIES[family][0]()
    keys, ctx_dim = (SD2_KEYS, 64) if family == "sd2" else (SDXL_KEYS, 96)
    seen = {}

    def recorder(kind):
        def fn(q, k, v, extra):
            seen[(kind, extra["block"] + (extra["block_index"],))] = (q.shape[1], k.shape[1], extra["dim_head"])
            return attention.optimized_attention(q, k, v, extra["n_heads"])
        return fn

    patched = model.clone()
    for key in keys:
        patched.set_model_attn1_replace(recorder("attn1"), *key)
        patched.set_model_attn2_replace(recorder("attn2"), *key)
    x = torch.randn(1, 4, 8, 8)
    kw = model_conds(patched, torch.randn(1, 77, ctx_dim), torch.randn(1, 64), x)
    with torch.no_grad():
        patched.model.apply_model(x, torch.tensor([1.0]),
                                  transformer_options=patched.model_options["transformer_options"], **kw)
    assert {k for _, k in seen} == set(keys)
    for (kind, key), (nq, nk, dim_head) in seen.items():
        assert nq == 64 // keys[key]
        assert nk == (nq if kind == "attn1" else 77)
        assert dim_head == comfy_tiny.TINY_HEAD_CHANNELS


# ----------------------------------------------------------------------------------------------
# family-marked checkpoints through the real loader and executor
# ----------------------------------------------------------------------------------------------

def test_checkpoint_patch_families(tiny_checkpoint, comfy_session, tmp_path):
    legacy = tmp_path / "legacy.safetensors"          # marker written before families existed
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(legacy),
                                metadata={comfy_tiny_checkpoint.TINY_CKPT_METADATA_KEY: json.dumps({"seed": 0})})
    expected = {"sd15": (ModelType.EPS, "l", 4), "sd2": (ModelType.V_PREDICTION, "h", 4),
                "sdxl": (ModelType.EPS, "g", 4), "sd3": (ModelType.FLOW, "t5xxl", 16),
                "flux": (ModelType.FLUX, "t5xxl", 16)}
    folder = comfy_session.folder("checkpoints")
    for family, (mtype, tok, channels) in expected.items():
        name = tiny_checkpoint.add(f"vct_tiny_fam_{family}.safetensors", family=family)
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(folder / name))
        assert model.model.model_type == mtype and tok in clip.tokenize("x") and vae.downscale_ratio == 8
        # VAEEncode's latent fits the model: 16 channels for SD3 and Flux, also through the tiled fallback
        assert vae.encode(torch.rand(1, 32, 40, 3)).shape == (1, channels, 4, 5) and vae.latent_channels == channels
        assert model.model.latent_format.latent_channels == channels
        assert tiny_checkpoint.calls[-1]["family"] == family
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(legacy))
    assert type(model.model) is comfy.model_base.BaseModel and list(clip.tokenize("x")) == ["l"]
    assert tiny_checkpoint.calls[-1]["family"] == "sd15"
    with pytest.raises(ValueError, match="family"):
        comfy_tiny_checkpoint.write_tiny_checkpoint_file(tmp_path / "bad.safetensors", family="sd4")
    # Real checkpoint names -> the tiny family standing in for them (shipped templates run on it)
    assert [comfy_tiny_checkpoint.checkpoint_family(n) for n in (
        "v1-5-pruned-emaonly.safetensors", "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
        "sd3.5_large.safetensors", "flux1-dev-fp8.safetensors", "FLUX.1-schnell.safetensors")] == [
        "sd15", "sd3", "sd3", "flux", "flux"]


def family_prompt(ckpt_name: str, sdxl_encode: bool = False) -> dict:
    def encode(text):
        if sdxl_encode:
            return {"class_type": "CLIPTextEncodeSDXL", "inputs": {
                "clip": ["1", 1], "width": 64, "height": 64, "crop_w": 0, "crop_h": 0,
                "target_width": 64, "target_height": 64, "text_g": text, "text_l": text}}
        return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": encode("a photo of a cat"),
        "3": encode(""),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": 0, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "vct_family"}},
    }


@pytest.mark.parametrize("family,sdxl_encode", [("sd2", False), ("sdxl", False), ("sdxl", True)])
def test_ksampler_prompt_runs_with_family_checkpoint(tiny_checkpoint, comfy_session, family, sdxl_encode):
    from PIL import Image

    name = tiny_checkpoint.add(f"vct_tiny_{family}.safetensors", family=family)
    result = run_prompt(family_prompt(name, sdxl_encode))
    assert result.success and not result.interrupted
    files = result.output_files("7")
    assert len(files) == 1 and files[0].is_file() and files[0].parent == comfy_session.output_dir
    assert Image.open(files[0]).size == (64, 64)
    assert [c["family"] for c in tiny_checkpoint.calls] == [family]
    assert [v for n, v, _ in result.server.progress if n == "5"] == [1, 2]
