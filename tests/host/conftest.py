"""Host tier: tests against a real ComfyUI found through the COMFYUI_PATH environment variable.

Without a usable COMFYUI_PATH every test module in this folder is reported as skipped, with the
reason in the summary (pyproject's `-ra`), before any of it is imported - so these modules may
import ComfyUI at top level. With one, ComfyUI is bootstrapped once per session on CPU
(`comfy_env.ensure_bootstrapped`): its output/input/temp/user/models/custom_nodes folders point
at a per-session temp folder (removed at the end; set VCT_KEEP_TMP=1 to keep it).

Fixtures (see the helper modules for details):
    comfy_session            ComfyEnv: comfyui_path, session_dir, output_dir, input_dir, temp_dir,
                             custom_nodes_dir, folder(name) -> models/<name>, version
    embedding_file           factory (name, tensor [n, 64], key="clip_l") -> Path of a .safetensors in
                             the session's embeddings folder; removed after the test
    input_image              factory (name, width=32, height=32, seed=0) -> Path of a random RGB PNG in
                             the session's input folder (what LoadImage lists); removed after the test
    tiny_model               comfy_tiny.tiny_sd15_model() (ModelPatcher, fresh per test)
    tiny_clip                comfy_tiny.tiny_sd1_clip(<session embeddings folder>)
    tiny_vae                 comfy_tiny.tiny_vae()
    tiny_checkpoint          TinyCheckpoint: placeholder `vct_tiny_sd15.safetensors` in the session's
                             checkpoints folder + comfy.sd.load_checkpoint_guess_config and
                             comfy.controlnet.load_controlnet patched (this test only), so
                             CheckpointLoaderSimple & co. return fresh tiny models and ControlNetLoader
                             a tiny ControlNet; .name, .add(name, seed=0, family="sd15"),
                             .add_controlnet(name), .calls
    pack                     comfy_runner.Pack of vct_pack: its node classes and modules (identity, training, ...)
    setup                    (module) a tiny SD1.5 model and CLIP, a latent, its 10-step inversion and null-text tuning
    vct_pack                 comfy_runner.LoadedPack of this repository, loaded once per session as
                             custom_nodes/ComfyUI-VCT with nodes.load_custom_node (errors with
                             ComfyUI's log if the pack does not load)
Every test here also unloads ComfyUI's loaded models and clears a pending interrupt afterwards.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the support package, also under --import-mode=importlib
    sys.path.insert(0, str(_HERE))

from support import comfy_env  # noqa: E402  (imports nothing from ComfyUI)

_COMFY_PATH, SKIP_REASON = comfy_env.find_comfyui()
_SESSION_DIR: str | None = None

if _COMFY_PATH is not None:
    _SESSION_DIR = tempfile.mkdtemp(prefix="vct-host-")
    try:
        comfy_env.ensure_bootstrapped(session_dir=_SESSION_DIR)
    except ImportError as e:  # e.g. run with a Python that lacks ComfyUI's dependencies
        SKIP_REASON = f"ComfyUI at {_COMFY_PATH} cannot be imported with {sys.executable}: {e!r}"
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)
        _SESSION_DIR = None
    except BaseException:  # a broken harness is an error, not a skip
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)
        raise


class _SkippedModule(pytest.Module):
    """A test module that is not imported and reports the host-tier skip reason instead."""

    def collect(self):
        raise pytest.skip.Exception(SKIP_REASON, allow_module_level=True)


def pytest_configure(config):
    # CI sets VCT_REQUIRE_HOST=1 with COMFYUI_PATH: a host tier that cannot run is then a failure,
    # not a silent skip.
    if SKIP_REASON is not None and os.environ.get("VCT_REQUIRE_HOST") == "1":
        raise pytest.UsageError(f"VCT_REQUIRE_HOST=1 but the host tier cannot run: {SKIP_REASON}")


def pytest_pycollect_makemodule(module_path, parent):
    if SKIP_REASON is not None:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_report_header(config):
    if SKIP_REASON is not None:
        return [f"host tier: skipped ({SKIP_REASON})"]
    env = comfy_env.get_env()
    return [f"host tier: ComfyUI {env.version} at {env.comfyui_path} (CPU), session folder {env.session_dir}"]


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_DIR is not None and not os.environ.get("VCT_KEEP_TMP"):
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# fixtures (only requested by modules that were collected, i.e. when ComfyUI is available)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy_session():
    return comfy_env.get_env()


@pytest.fixture(autouse=True)
def _comfy_cleanup():
    yield
    if SKIP_REASON is None:
        import comfy.model_management

        comfy.model_management.interrupt_current_processing(False)
        comfy.model_management.unload_all_models()


@pytest.fixture
def embedding_file(comfy_session):
    """Factory: embedding_file(name, tensor, key="clip_l") writes models/embeddings/<name>.safetensors."""
    import safetensors.torch

    written: list[Path] = []

    def make(name: str, tensor, key: str | None = "clip_l") -> Path:
        path = comfy_session.folder("embeddings") / f"{name}.safetensors"
        t = tensor.detach().to("cpu").contiguous().clone()
        safetensors.torch.save_file({key or "emb_params": t}, str(path))
        written.append(path)
        return path

    yield make
    for p in written:
        p.unlink(missing_ok=True)


@pytest.fixture
def input_image(comfy_session):
    """Factory: input_image(name, width=32, height=32, seed=0) writes input/<name> (PNG, random RGB)."""
    import numpy as np
    from PIL import Image

    written: list[Path] = []

    def make(name: str, width: int = 32, height: int = 32, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        path = comfy_session.input_dir / name
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format="PNG")
        written.append(path)
        return path

    yield make
    for p in written:
        p.unlink(missing_ok=True)


@pytest.fixture
def tiny_model():
    from support import comfy_tiny

    return comfy_tiny.tiny_sd15_model()


@pytest.fixture
def tiny_clip(comfy_session):
    from support import comfy_tiny

    return comfy_tiny.tiny_sd1_clip(str(comfy_session.folder("embeddings")))


@pytest.fixture
def tiny_vae():
    from support import comfy_tiny

    return comfy_tiny.tiny_vae()


class TinyCheckpoint:
    """Handle returned by the `tiny_checkpoint` fixture."""

    def __init__(self, folder: Path, patch, controlnet_folder: Path | None = None):
        self.folder, self.patch, self.files = folder, patch, []
        self.controlnet_folder = controlnet_folder
        self.name = self.add("vct_tiny_sd15.safetensors")

    def add(self, name: str, seed: int = 0, family: str = "sd15") -> str:
        """Make `name` (e.g. a real checkpoint name a shipped workflow uses) load as a tiny checkpoint
        of `family` ("sd15", "sd2", "sdxl", "sd3" or "flux"; see comfy_tiny_checkpoint.tiny_checkpoint)."""
        from support import comfy_tiny_checkpoint

        path = comfy_tiny_checkpoint.write_tiny_checkpoint_file(self.folder / name, seed=seed, family=family)
        self.files.append(path)
        return name

    def add_controlnet(self, name: str) -> str:
        """Make `name` (e.g. a shipped workflow's ControlNet) load as comfy_tiny_controlnet.tiny_sd15_controlnet()."""
        from support import comfy_tiny_controlnet

        self.files.append(comfy_tiny_controlnet.write_tiny_controlnet_file(self.controlnet_folder / name))
        return name

    @property
    def calls(self) -> list[dict]:
        return self.patch.calls


@pytest.fixture
def tiny_checkpoint(comfy_session, monkeypatch):
    import comfy.controlnet
    import comfy.sd
    from support import comfy_tiny_checkpoint, comfy_tiny_controlnet

    patch = comfy_tiny_checkpoint.TinyCheckpointPatch(comfy.sd.load_checkpoint_guess_config)
    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", patch)
    monkeypatch.setattr(comfy.controlnet, "load_controlnet",
                        comfy_tiny_controlnet.TinyControlNetPatch(comfy.controlnet.load_controlnet))
    handle = TinyCheckpoint(comfy_session.folder("checkpoints"), patch, comfy_session.folder("controlnet"))
    yield handle
    for f in handle.files:
        f.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def pack(vct_pack):
    """The loaded pack's node classes and modules (comfy_runner.Pack)."""
    from support.comfy_runner import Pack

    return Pack(vct_pack)


@pytest.fixture(scope="session")
def vct_pack(comfy_session):
    from support import comfy_runner

    return comfy_runner.load_pack()


SETUP_STEPS = 10


@pytest.fixture(scope="module")
def setup(pack, comfy_session):
    """A tiny SD1.5 model and CLIP, a source latent, its inversion in 10 steps and its null-text tuning."""
    import torch
    from support import comfy_tiny
    from support.comfy_runner import encode

    model = comfy_tiny.tiny_sd15_model(seed=0)
    clip = comfy_tiny.tiny_sd1_clip(str(comfy_session.folder("embeddings")))
    source, negative = encode(clip, ""), encode(clip, "a photo of a cat")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion, noise = pack.run("VCTDDIMInvert", model, latent, source, SETUP_STEPS)
    tuned, loss_image = pack.run("VCTNullTextInvert", model, inversion, 7.5, 50, 1e-5, negative=negative)
    return dict(model=model, clip=clip, source=source, negative=negative, latent=latent, inversion=inversion,
                noise=noise, tuned=tuned, loss_image=loss_image)
