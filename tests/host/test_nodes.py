"""The VCT nodes inside a real ComfyUI, on tiny random-weight SD1.x models built from ComfyUI's classes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from support import comfy_tiny
from support.comfy_runner import encode

EXPECTED_NODES = {"VCTDDIMInvert", "VCTNullTextInvert", "VCTConceptLearn", "VCTConceptPrompt", "VCTDualBranchSampler",
                  "VCTSaveInversion", "VCTLoadInversion"}
STEPS = 10


def test_pack_registers_exactly_the_documented_nodes(vct_pack):
    assert set(vct_pack.node_ids) == EXPECTED_NODES




def test_node_inversion_equals_the_kernel_on_the_same_model(pack, setup):
    model, latent, vct = setup["model"], setup["latent"], pack.vct_ops
    sigmas = vct.ddim_sigmas(model.get_model_object("model_sampling").sigmas.float(), STEPS)
    z0 = model.model.process_latent_in(latent["samples"])

    def denoise(x, sigma, cond, options=None):
        return model.model.apply_model(x, sigma, c_crossattn=cond)

    with torch.inference_mode():
        expected = vct.ddim_invert(denoise, vct.latent_to_x(z0, sigmas[-1]), sigmas, setup["source"][0][0])
    torch.testing.assert_close(setup["inversion"].trajectory, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(setup["noise"]["samples"], model.model.process_latent_out(expected[-1]))


def test_null_text_reconstruction_far_better_than_plain_through_the_sampler(pack, setup):
    model, inversion, tuned, z0 = setup["model"], setup["inversion"], setup["tuned"], setup["latent"]["samples"]
    # Plain: CFG 7.5 with the untuned initial null embedding at every step.
    negative = pack.conditioning.model_cond(model, setup["negative"], "negative", z0.shape)
    plain = dataclasses.replace(inversion, null_embeddings={k: v[None].repeat(STEPS, *[1] * v.dim())
                                                           for k, v in negative.items()})
    plain_mse = float(((pack.run("VCTDualBranchSampler", model, plain, setup["source"], 7.5, 0.9, 0.2, 0.5)[1]
                        ["samples"] - z0) ** 2).mean())
    tuned_mse = float(((pack.run("VCTDualBranchSampler", model, tuned, setup["source"], 7.5, 0.9, 0.2, 0.5)[1]
                        ["samples"] - z0) ** 2).mean())
    print(f"reconstruction MSE through the nodes at CFG 7.5: plain {plain_mse:.4g}, null-text {tuned_mse:.4g}")
    assert tuned_mse * 10 < plain_mse
    assert setup["loss_image"].shape[0] == 1 and setup["loss_image"].shape[-1] == 3


def test_concept_equal_to_source_gives_the_reconstruction(pack, setup):
    latent, reconstruction = pack.run("VCTDualBranchSampler", setup["model"], setup["tuned"], setup["source"],
                                      7.5, 0.9, 0.2, 0.5)
    # Exact: with the concept equal to the source, B's rows are computed exactly as B*'s are.
    assert torch.equal(latent["samples"], reconstruction["samples"])


@pytest.mark.parametrize("equalizer, scaled", [("concept_tokens", [1, 2, 3]), ("reference_code", [0, 1, 2])])
def test_equalizer_scales_the_chosen_token_positions(pack, setup, equalizer, scaled):
    config = pack.tokens.injection_config(setup["source"][0][0], [[setup["negative"][0][0], {}]], 0.9, 0.2,
                                                  0.5, 3, equalizer)
    assert [i for i, w in enumerate(config.weights.tolist()) if w != 1.0] == scaled
    assert all(config.weights[i] == 0.5 for i in scaled)
    with pytest.raises(ValueError, match="equalizer"):
        pack.tokens.injection_config(setup["source"][0][0], [[setup["negative"][0][0], {}]], 0.9, 0.2, 0.5,
                                             3, "start_token")


def snapshot(model):
    """Return what a model's options hold: option keys and every registered replace patch."""
    options = model.model_options
    replace = options.get("transformer_options", {}).get("patches_replace", {})
    return (sorted(options), sorted(options.get("transformer_options", {})),
            sorted((kind, key, id(fn)) for kind, patches in replace.items() for key, fn in patches.items()))


def recording_patches(model, pack, log, kind="attn1"):
    """Register, on `model` (a clone), a plain-attention replace patch per block that logs what it saw."""

    def make(key):
        def patch(q, k, v, extra):
            roles = extra.get(pack.vct_ops.ROLES_KEY)
            if roles is not None:
                entry = {"key": key, "roles": list(roles), "sigma": float(extra["sigmas"].max()),
                         "queries": q.shape[1]}
                if "ref" in roles and "main" in roles:
                    ref, main = roles.index("ref"), roles.index("main")
                    entry["borrowed"] = torch.equal(q[main], q[ref]) and torch.equal(k[main], k[ref])
                log.append(entry)
            return pack.vct_ops.sdpa_attention(q, k, v, extra["n_heads"])
        return patch

    for key in pack.sd_unet.transformer_block_keys(model):
        model.set_model_patch_replace(make(key), kind, *key)


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "split-for-memory"])
def test_translation_uses_reconstruction_self_attention_exactly_where_injected(pack, setup, split, monkeypatch):
    import comfy.model_management

    if split:
        def no_memory(dev=None, torch_free_too=False):
            return (1, 1) if torch_free_too else 1

        monkeypatch.setattr(comfy.model_management, "get_free_memory", no_memory)
    model = setup["model"].clone()
    log = []
    recording_patches(model, pack, log)
    options_before = snapshot(model)
    weights_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    pack.run("VCTDualBranchSampler", model, setup["tuned"], setup["negative"], 7.5, 0.6, 0.2, 0.5, concept_tokens=3)

    sigmas = setup["tuned"].sigmas
    injected_steps = int(0.6 * STEPS)
    small = {("input", 3, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)}  # 16 queries <= 64 / 4
    checked = 0
    for entry in log:
        if "borrowed" not in entry:
            continue
        step = int(torch.argmin((sigmas[:-1] - entry["sigma"]).abs()))
        if step == 0 and entry["key"] == ("input", 1, 0):
            continue  # both branches see identical inputs in the first block of the first step
        expected = step < injected_steps and entry["key"] in small
        assert entry["borrowed"] == expected, entry
        checked += 1
    assert checked >= (STEPS - 1) * 7 - 1
    uncond_only = [e for e in log if set(e["roles"]) == {"uncond"}]
    assert bool(uncond_only) == split, "the batch must be split only when memory is short"
    # The model given to the sampler is unchanged: same options (our patches went on a clone), same weights.
    assert snapshot(model) == options_before
    for k, v in model.model.diffusion_model.state_dict().items():
        assert torch.equal(v, weights_before[k]), k


def test_an_existing_attn2_replace_patch_is_still_called(pack, setup):
    calls = []

    def adapter(q, k, v, extra):  # stands for an IP-Adapter: text attention plus its own term
        calls.append(extra.get("cond_or_uncond"))
        return pack.vct_ops.sdpa_attention(q, k, v, extra["n_heads"]) + 0.05

    model = setup["model"].clone()
    model.set_model_attn2_replace(adapter, "input", 1, 0)
    with_adapter = pack.run("VCTDualBranchSampler", model, setup["tuned"], setup["negative"], 7.5, 0.9, 0.2, 0.5,
                            concept_tokens=3)
    without = pack.run("VCTDualBranchSampler", setup["model"], setup["tuned"], setup["negative"], 7.5, 0.9, 0.2, 0.5,
                       concept_tokens=3)
    assert len(calls) == STEPS - 1, "called once per model call"
    assert calls[0] == [1, 1, 0, 0], "it is told which rows are unconditional"
    assert not torch.allclose(with_adapter[0]["samples"], without[0]["samples"])


def test_gradients_reach_null_embeddings_and_concept_vectors_on_models_built_in_inference_mode(pack, setup):
    with torch.inference_mode():  # as CheckpointLoaderSimple builds them
        model = comfy_tiny.tiny_sd15_model(seed=3)
        clip = comfy_tiny.tiny_sd1_clip(seed=4)
    x = torch.randn(1, 4, 8, 8)
    sigma = torch.tensor([2.0])
    with pack.training.training_mode():
        pack.denoiser.load(model)
        pack.training.make_autograd_safe(model.model.diffusion_model)
        denoise = pack.denoiser.Denoiser(model, gradients=True)
        phi = setup["source"][0][0].clone().requires_grad_(True)
        denoise(x, sigma, {"c_crossattn": phi}).square().mean().backward()
        assert phi.grad is not None and float(phi.grad.abs().sum()) > 0

        encoders = pack.clip_text.clip_encoders(clip, "test")
        vectors = {e.key: pack.clip_text.initializer_vectors(e, "dog", 3).requires_grad_(True) for e in encoders}
        to_model = pack.conditioning.differentiable_model_cond(model, "concept", x.shape, model.load_device)
        gradient_cond = pack.clip_text.GradientEncoder(encoders, to_model)(vectors)
        denoise(x, sigma, gradient_cond).square().mean().backward()
        assert all(v.grad is not None and float(v.grad.abs().sum()) > 0 for v in vectors.values())
    with torch.inference_mode():
        regular = pack.prompts.encode_concept(encoders, {k: v.detach() for k, v in vectors.items()})[0][0]
    torch.testing.assert_close(gradient_cond["c_crossattn"].detach(), regular, rtol=1e-4, atol=1e-4)


def test_saved_concept_loads_through_a_plain_embedding_prompt(pack, setup, comfy_session):
    clip, model = setup["clip"], setup["model"]
    reference = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    path = comfy_session.folder("embeddings") / "vct_test_concept.safetensors"
    try:
        cond, concept, plot = pack.run("VCTConceptLearn", model, clip, reference, "dog", 3, 4, 5e-4, 2, 1.0, 0,
                                       "vct_test_concept", False)
        assert path.is_file() and concept.num_vectors == 3 and len(concept.losses) == 4
        with torch.inference_mode():
            again = encode(clip, "embedding:vct_test_concept")
        torch.testing.assert_close(again[0][0], cond[0][0])
        with pytest.raises(ValueError, match="already exists"):
            pack.run("VCTConceptLearn", model, clip, reference, "dog", 3, 1, 5e-4, 1, 1.0, 0, "vct_test_concept",
                     False)
        pack.run("VCTConceptLearn", model, clip, reference, "dog", 3, 1, 5e-4, 1, 1.0, 0, "vct_test_concept", True)
        seeded = [pack.run("VCTConceptLearn", model, clip, reference, "dog", 3, 3, 5e-4, 2, 1.0, 5, "", False)[1]
                  for _ in range(2)]
        assert torch.equal(seeded[0].vectors["clip_l"], seeded[1].vectors["clip_l"]), "seeded runs repeat"
    finally:
        path.unlink(missing_ok=True)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "no temporary files left behind"




def test_bad_inputs_get_clear_errors(pack, setup):
    model, clip, tuned = setup["model"], setup["clip"], setup["tuned"]
    with pytest.raises(ValueError, match="steps"):
        pack.run("VCTDDIMInvert", model, setup["latent"], setup["source"], 0)
    with pytest.raises(ValueError, match="another model"):
        pack.run("VCTNullTextInvert", comfy_tiny.tiny_sd15_model(seed=5), tuned, 7.5, 2, 1e-5)
    with pytest.raises(ValueError, match="initializer"):
        pack.run("VCTConceptLearn", model, clip, setup["latent"], "  ", 3, 2, 5e-4, 1, 1.0, 0, "", False)
    with pytest.raises(ValueError, match="plain file name"):
        pack.run("VCTConceptLearn", model, clip, setup["latent"], "dog", 3, 2, 5e-4, 1, 1.0, 0, "../evil", False)
    narrow = [[torch.zeros(1, 77, 32), {}]]
    with pytest.raises(ValueError, match="another model's text encoder"):
        pack.run("VCTDualBranchSampler", model, tuned, narrow, 7.5, 0.9, 0.2, 0.5)
    with pytest.raises(ValueError, match="Null-Text"):
        pack.run("VCTDualBranchSampler", model, setup["inversion"], setup["negative"], 7.5, 0.9, 0.2, 0.5)
    with pytest.raises(ValueError, match="channels"):
        pack.run("VCTDDIMInvert", model, {"samples": torch.zeros(1, 16, 8, 8)}, setup["source"], 5)
    nan = {"samples": torch.full((1, 4, 8, 8), float("nan"))}
    with pytest.raises(ValueError, match="NaN"):
        pack.run("VCTDDIMInvert", model, nan, setup["source"], 5)


def test_joint_blocks_other_than_all_are_refused_on_the_unet(pack, setup):
    with pytest.raises(ValueError, match="joint_blocks is 'first_half', a choice for SD3 and Flux.*set it to auto"):
        pack.run("VCTDualBranchSampler", setup["model"], setup["tuned"], setup["source"], 7.5, 0.9, 0.2, 0.5,
                 joint_blocks="first_half")


def test_another_model_family_is_refused_by_name(pack, setup):
    import comfy.supported_models

    other = setup["model"].clone()
    config = comfy.supported_models.SDXLRefiner(comfy_tiny.tiny_sd15_unet_config())
    original = other.model.model_config
    try:
        other.model.model_config = config
        with pytest.raises(ValueError, match="SDXLRefiner model.*SD15, SD20, SDXL"):
            pack.run("VCTDDIMInvert", other, setup["latent"], setup["source"], 5)
    finally:
        other.model.model_config = original


def test_content_inversion_methods_costs_and_errors(pack, setup):
    model, inversion, z0 = setup["model"], setup["inversion"], setup["latent"]["samples"]
    figures = {}
    for method in ("null_text", "negative_prompt", "direct"):
        counted = model.clone()
        calls = []

        def wrapper(apply_model, args, calls=calls):
            calls.append((args["input"].shape[0], torch.is_grad_enabled()))
            return apply_model(args["input"], args["timestep"], **args["c"])

        counted.set_model_unet_function_wrapper(wrapper)
        tuned, _ = pack.run("VCTNullTextInvert", counted, inversion, 7.5, 50, 1e-5, method=method,
                            negative=setup["negative"])
        latent, reconstruction = pack.run("VCTDualBranchSampler", model, tuned, setup["negative"], 7.5, 0.9, 0.2,
                                          0.5, concept_tokens=3)
        figures[method] = (
            sum(1 for _, grad in calls if not grad), sum(1 for _, grad in calls if grad),
            float(((reconstruction["samples"] - z0) ** 2).mean()),
            float(((latent["samples"] - reconstruction["samples"]) ** 2).mean()),
        )
    for method, (fwd, fwd_bwd, recon, distance) in figures.items():
        print(f"{method}: inversion-node model calls {fwd} forward + {fwd_bwd} forward+backward, "
              f"B* MSE {recon:.4g}, B-B* MSE {distance:.4g}")
    assert figures["null_text"][1] > 0
    assert figures["negative_prompt"][:2] == (0, 0) and figures["direct"][:2] == (0, 0)
    assert figures["direct"][2] < 1e-8, "direct inversion rebuilds the source exactly"
    assert figures["null_text"][2] < figures["negative_prompt"][2]


def test_fingerprint_is_stable_across_loading_and_tells_patches_apart(pack, setup):
    import comfy.model_management

    base = setup["model"]
    key = next(k for k in base.model_state_dict() if k.endswith("attn2.to_k.weight"))
    shape = base.model_state_dict()[key].shape
    patched = base.clone()
    patched.add_patches({key: (torch.full(shape, 0.5),)}, 1.0)
    other = base.clone()
    other.add_patches({key: (torch.full(shape, -0.5),)}, 1.0)
    before = pack.identity.model_fingerprint(patched)
    comfy.model_management.load_models_gpu([patched])
    loaded = pack.identity.model_fingerprint(patched)
    comfy.model_management.unload_all_models()
    after = pack.identity.model_fingerprint(patched)
    assert before == loaded == after
    assert len({before, pack.identity.model_fingerprint(base), pack.identity.model_fingerprint(other)}) == 3


def test_nodes_run_on_models_patched_by_core_nodes(pack, setup):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    model = setup["model"]
    # Deep Shrink reads transformer_options["sigmas"]; SAG reads cond_or_uncond and logs a warning.
    shrunk = PatchModelAddDownscale.execute(model, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic").args[0]
    inversion, _ = pack.run("VCTDDIMInvert", shrunk, setup["latent"], setup["source"], 4)
    assert torch.isfinite(inversion.trajectory).all()
    sag = SelfAttentionGuidance.execute(model, 0.5, 2.0).args[0]
    inversion, _ = pack.run("VCTDDIMInvert", sag, setup["latent"], setup["source"], 4)
    assert torch.isfinite(inversion.trajectory).all()
