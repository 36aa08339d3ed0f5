"""The code paths for newer ComfyUI (0.38.x), exercised on the pinned host with stand-ins that behave
like 0.38.x's objects where they differ: an executor that requires `cache_args`, and model patchers
whose weights are cast per call into one reused buffer (Dynamic VRAM; partial loads on 0.38.x).

A stand-in reproduces the hazard itself (gradients through it are wrong unless the pack guards
them), so a regression in the detection fails these tests.
"""
from __future__ import annotations

import uuid

import comfy.model_management
import comfy.model_patcher
import execution
import pytest
import torch
from support import comfy_runner, comfy_tiny, comfy_tiny_controlnet
from support.comfy_runner import encode
from test_memory import pass_with_gradient


def reused_buffer(buffers: dict, kind: str):
    """Return a weight function that copies each cast into one shared buffer and returns a view of it,
    as 0.38.x's casts into vbar slots and per-stream cast buffers do."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        key = (kind, tensor.dtype, tensor.device)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < tensor.numel():
            with torch.inference_mode(False):
                buffer = buffers[key] = torch.zeros(max(tensor.numel(), 1 << 16), dtype=tensor.dtype,
                                                    device=tensor.device)
        view = buffer[: tensor.numel()].view(tensor.shape)
        # A copy engine writes the buffer behind autograd's back: no version bump, no error in backward.
        view.data.copy_(tensor)
        return view

    return cast


class CastPerCallPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose loaded layers cast their weights per call into shared buffers (weight
    functions that a patcher adds, such as LoRA or wrappers, run after the cast, as on 0.38.x)."""

    dynamic = True

    def is_dynamic(self):
        return self.dynamic

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        super().load(device_to, lowvram_model_memory, force_patch_weights, full_load)
        buffers = self.model.__dict__.setdefault("_reused_cast_buffers", {})
        for module in self.model.modules():
            if hasattr(module, "comfy_cast_weights"):
                module.comfy_cast_weights = True
                module.weight_function = [reused_buffer(buffers, "weight")] + list(module.weight_function)
                module.bias_function = [reused_buffer(buffers, "bias")] + list(module.bias_function)
        self.model.model_lowvram = not self.dynamic  # a partial load on 0.38.x


class PartialLoadPatcher(CastPerCallPatcher):
    """Not dynamic, but only partly loaded: the offloaded layers cast per call (0.38.x with offload streams)."""

    dynamic = False


KINDS = {"dynamic": CastPerCallPatcher, "partial": PartialLoadPatcher}


def cast_per_call(patcher, kind: str):
    """Return a clone of `patcher` (a model's, or a CLIP's) that loads like the stand-in of that kind."""
    clone = patcher.clone()
    clone.__class__ = KINDS[kind]
    # Loaded afresh even where the original is loaded already (as a CLIP is from its construction).
    clone.patches_uuid = uuid.uuid4()
    return clone


def clip_cast_per_call(clip, kind: str):
    """Return a clone of `clip` whose text encoder loads like the stand-in of that kind."""
    clone = clip.clone()
    clone.patcher = cast_per_call(clip.patcher, kind)
    return clone


@pytest.mark.parametrize("kind", ["dynamic", "partial"])
def test_a_cast_per_call_stand_in_breaks_raw_gradients_and_the_training_load_repairs_them(pack, comfy_session,
                                                                                          kind):
    with torch.inference_mode():
        plain = comfy_tiny.tiny_sd15_model(seed=5)
        standin = cast_per_call(comfy_tiny.tiny_sd15_model(seed=5), kind)
        phi = encode(comfy_tiny.tiny_sd1_clip(seed=6), "a cat")[0][0].repeat(2, 1, 1)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 0.5])

    plain_out, plain_grad, _ = pass_with_gradient(pack, plain, phi, x, sigma)
    raw_out, raw_grad, _ = pass_with_gradient(pack, standin, phi, x, sigma)
    torch.testing.assert_close(raw_out, plain_out, rtol=1e-5, atol=1e-5)  # forward passes agree ...
    assert not torch.allclose(raw_grad, plain_grad, rtol=1e-2, atol=1e-4)  # ... raw gradients do not

    with pack.training.training_mode():
        safe, _ = pack.training.load_for_training(standin)
    assert safe is not standin and type(safe) is type(standin)
    safe_out, safe_grad, _ = pass_with_gradient(pack, safe, phi, x, sigma)
    torch.testing.assert_close(safe_out, plain_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(safe_grad, plain_grad, rtol=1e-4, atol=1e-6)

    with pack.training.training_mode():  # an ordinary, fully loaded model is trained as it is
        assert pack.training.load_for_training(plain)[0] is plain


@pytest.mark.parametrize("kind", ["dynamic", "partial"])
def test_training_nodes_give_the_same_results_when_weights_are_cast_per_call(pack, comfy_session, kind):
    embeddings = str(comfy_session.folder("embeddings"))
    with torch.inference_mode():
        plain_model, plain_clip = comfy_tiny.tiny_sd15_model(seed=7), comfy_tiny.tiny_sd1_clip(embeddings, seed=8)
        model = cast_per_call(comfy_tiny.tiny_sd15_model(seed=7), kind)
        clip = clip_cast_per_call(comfy_tiny.tiny_sd1_clip(embeddings, seed=8), kind)
        source = encode(plain_clip, "")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}

    def run_all(model, clip):
        inversion = pack.run("VCTDDIMInvert", model, latent, source, 3)[0]
        tuned = pack.run("VCTNullTextInvert", model, inversion, 7.5, 4, 1e-5)[0]
        concept = pack.run("VCTConceptLearn", model, clip, latent, "dog", 2, 3, 5e-4, 4, 1.0, 0, "", False)
        return tuned.null_embeddings, concept[0][0][0]

    plain_nulls, plain_concept = run_all(plain_model, plain_clip)
    nulls, concept = run_all(model, clip)
    for key in plain_nulls:
        torch.testing.assert_close(nulls[key], plain_nulls[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(concept, plain_concept, rtol=1e-4, atol=1e-5)
    assert not torch.equal(plain_concept, encode(plain_clip, "dog dog")[0][0])  # the concept did train


def test_memory_decisions_ask_the_patcher_for_free_memory(pack, comfy_session, monkeypatch):
    """0.38.x's ModelPatcher.get_free_memory counts what Dynamic VRAM frees on demand; it is asked first."""
    with torch.inference_mode():
        model = cast_per_call(comfy_tiny.tiny_sd15_model(seed=5), "dynamic")
    x = torch.zeros(4, 4, 8, 8)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 1 << 50)
    for free, fits in ((0, False), (1 << 50, True)):
        monkeypatch.setattr(type(model), "get_free_memory", lambda self, device, free=free: free, raising=False)
        assert pack.denoiser.Denoiser(model).fits(x) is fits
        assert pack.training.training_fits(model, x.shape) is fits


def test_training_turns_on_comfyuis_training_kernels_and_restores_the_flag(pack, monkeypatch):
    monkeypatch.setattr(comfy.model_management, "in_training", False, raising=False)
    with pack.training.training_mode():
        assert comfy.model_management.in_training is True
    assert comfy.model_management.in_training is False


class CacheArgsExecutor(execution.PromptExecutor):
    """A PromptExecutor with 0.38.x's constructor: `cache_args` replaces `cache_size` and must hold
    "ram" and "ram_inactive", which every prompt reads."""

    def __init__(self, server, cache_type=False, cache_args=None, asset_manager=None):
        self.cache_args = cache_args
        super().__init__(server, cache_type=cache_type)

    def execute(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):  # noqa: B006 - ComfyUI's signature
        self.cache_args["ram"], self.cache_args["ram_inactive"]  # raises TypeError on None, as 0.38.x does
        return super().execute(prompt, prompt_id, extra_data, execute_outputs)


def tiny_prompt(prefix: str) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def test_prompts_run_with_an_executor_that_requires_cache_args(vct_pack, comfy_session, monkeypatch):
    monkeypatch.setattr(execution, "PromptExecutor", CacheArgsExecutor)
    result = comfy_runner.run_prompt(tiny_prompt("vct_compat_runner"))
    assert isinstance(result.executor, CacheArgsExecutor) and result.success
    assert len(result.output_files("2")) == 1

    run_workflow = comfy_runner.run_workflow
    prompt = tiny_prompt("vct_compat_headless")
    saved = run_workflow.execute(prompt, run_workflow.validate(prompt))
    assert len(saved) == 1 and saved[0].is_file()


def test_the_executor_is_built_for_the_constructor_it_has(monkeypatch):
    build = comfy_runner.run_workflow.running.prompt_executor  # tools/vct_execute.py
    assert type(build(execution, comfy_runner.DummyServer())) is execution.PromptExecutor
    monkeypatch.setattr(execution, "PromptExecutor", CacheArgsExecutor)
    executor = build(execution, comfy_runner.DummyServer())
    assert executor.cache_args == {"lru": 0, "ram": 0, "ram_inactive": 0}


def test_null_text_through_a_source_controlnet_cast_per_call_keeps_its_gradients(pack, comfy_session):
    """Gradients to the null embeddings pass through a source prompt's ControlNet; its patcher is guarded too."""
    import nodes

    def run(control_kind):
        with torch.inference_mode():
            model = comfy_tiny.tiny_sd15_model(seed=9)
            clip = comfy_tiny.tiny_sd1_clip(seed=10)
            control = comfy_tiny_controlnet.tiny_sd15_controlnet(seed=11)
            if control_kind is not None:
                control.control_model_wrapped = cast_per_call(control.control_model_wrapped, control_kind)
            hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(12))
            empty = encode(clip, "")
            source, _ = nodes.ControlNetApplyAdvanced().apply_controlnet(empty, empty, control, hint, 1.0, 0.0, 1.0)
        latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(13))}
        inversion = pack.run("VCTDDIMInvert", model, latent, source, 3)[0]
        return pack.run("VCTNullTextInvert", model, inversion, 7.5, 3, 0.0)[0].null_embeddings

    plain = run(None)
    for kind in ("dynamic", "partial"):
        guarded = run(kind)
        for key in plain:
            torch.testing.assert_close(guarded[key], plain[key], rtol=1e-4, atol=1e-5)
