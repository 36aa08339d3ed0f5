"""Finding and bootstrapping a real ComfyUI for the host tier (headless, CPU only).

This module imports nothing from ComfyUI at import time, so `conftest.py` can decide to skip
the whole tier before anything breaks. `ensure_bootstrapped()` is idempotent and is also called
by `comfy_tiny` / `comfy_runner` at import, so scripts (e.g. `probe_comfy_autograd.py`) can use the
helpers without pytest:

    COMFYUI_PATH=/path/to/ComfyUI python tests/host/support/probe_comfy_autograd.py

What bootstrapping does (the order matters in ComfyUI 0.3.6x):
1. `sys.path.insert(0, COMFYUI_PATH)`;
2. `import comfy.cli_args; comfy.cli_args.args.cpu = True` before `comfy.model_management` is
   imported (it reads the flags at import time), so the device is the CPU even on a GPU machine;
3. `import utils.install_util` before `import nodes` (nodes.py puts `comfy/` on sys.path[0],
   where `comfy/utils.py` would then shadow ComfyUI's top-level `utils` package);
4. `nodes`, `execution`, `server`, `folder_paths`;
5. every folder ComfyUI writes to or lists from (`models/*` except `configs`, `output`, `input`,
   `temp`, `user`, `custom_nodes`) is redirected to a per-session temp folder, so tests never
   write into the ComfyUI checkout and never see the user's real models;
6. the built-in extra nodes (`comfy_extras`, V3 nodes included) are registered with
   `nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)`: no custom node
   folder is scanned; packs are loaded explicitly with `comfy_runner.load_pack`.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

HOST_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = HOST_DIR.parents[1]
TOOLS_DIR = REPO_ROOT / "tools"
PACK_NAME = "ComfyUI-VCT"

# Folders that are only read and hold files shipped with ComfyUI itself (e.g. v1-inference.yaml).
_KEEP_FOLDERS = {"configs"}


def load_tool(name: str):
    """Return the pack's tools/<name>.py as module `name`, imported once.

    The tools are files, not a package; the headless runner loads its siblings under the same names.
    """
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def find_comfyui() -> tuple[Path | None, str | None]:
    """Return (path, None) for a usable COMFYUI_PATH, else (None, reason to skip)."""
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw:
        return None, "COMFYUI_PATH is not set: host-tier tests need a ComfyUI checkout (COMFYUI_PATH=/path/to/ComfyUI)"
    path = Path(raw).expanduser().resolve()
    missing = [p for p in ("nodes.py", "execution.py", "folder_paths.py", "comfy/model_management.py")
               if not (path / p).is_file()]
    if missing:
        return None, f"COMFYUI_PATH={raw!r} is not a ComfyUI folder (missing {', '.join(missing)})"
    return path, None


@dataclass
class ComfyEnv:
    """What `ensure_bootstrapped()` set up (one per process)."""
    comfyui_path: Path
    session_dir: Path      # root of all redirected folders
    models_dir: Path       # session_dir/models/<folder name>
    output_dir: Path
    input_dir: Path
    temp_dir: Path
    user_dir: Path
    custom_nodes_dir: Path
    version: str

    def folder(self, name: str) -> Path:
        """The (single) redirected path of a models folder, e.g. folder("embeddings")."""
        return self.models_dir / name


_ENV: ComfyEnv | None = None
_LOCK = threading.Lock()


def run_async(coro):
    """Run a coroutine to completion from sync code (also when an event loop is already running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: dict = {}

    def target():
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the caller's thread
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def redirect_folders(session_dir: Path) -> None:
    """Point every ComfyUI folder that is written to or listed at `session_dir` (see module doc)."""
    import folder_paths

    models = session_dir / "models"
    for name, (_paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        if name in _KEEP_FOLDERS:
            continue
        target = session_dir / "custom_nodes" if name == "custom_nodes" else models / name
        target.mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[name] = ([str(target)], exts)
    folder_paths.models_dir = str(models)
    for sub, setter in (("output", folder_paths.set_output_directory), ("input", folder_paths.set_input_directory),
                        ("temp", folder_paths.set_temp_directory), ("user", folder_paths.set_user_directory)):
        (session_dir / sub).mkdir(parents=True, exist_ok=True)
        setter(str(session_dir / sub))
    folder_paths.filename_list_cache.clear()


def ensure_bootstrapped(session_dir: str | os.PathLike | None = None) -> ComfyEnv:
    """Import ComfyUI headless on CPU once per process and redirect its folders; return the ComfyEnv.

    Raises RuntimeError when COMFYUI_PATH is unusable (conftest turns that into a skip first).
    """
    global _ENV
    with _LOCK:
        if _ENV is not None:
            return _ENV
        path, reason = find_comfyui()
        if path is None:
            raise RuntimeError(reason)
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        # don't leave __pycache__ folders in the ComfyUI checkout for the imports below
        dont_write = sys.dont_write_bytecode
        sys.dont_write_bytecode = True
        try:
            return _bootstrap(path, session_dir)
        finally:
            sys.dont_write_bytecode = dont_write


def _bootstrap(path: Path, session_dir) -> ComfyEnv:
    global _ENV
    # The order of these imports matters (see the module doc); keep isort away from it.
    import comfy.cli_args

    # The host tier runs on the CPU; the benchmark sets VCT_BENCH_DEVICE=cuda to use a GPU.
    comfy.cli_args.args.cpu = os.environ.get("VCT_BENCH_DEVICE", "cpu") == "cpu"
    import comfy.model_management  # noqa: F401  (reads args.cpu now)

    # isort: split
    import utils.install_util  # noqa: F401  (must precede `import nodes`)

    # isort: split
    import execution  # noqa: F401
    import folder_paths  # noqa: F401
    import server  # noqa: F401  (comfy_extras/nodes_images does `from server import PromptServer`)

    # isort: split
    import nodes

    if Path(nodes.__file__).resolve() != path / "nodes.py":
        raise RuntimeError(f"`import nodes` gave {nodes.__file__}, not ComfyUI's nodes.py: something put another "
                           f"`nodes` (e.g. this pack's folder) on sys.path before ComfyUI")

    try:
        from comfyui_version import __version__ as version
    except ImportError:  # very old checkouts
        version = "unknown"

    if session_dir is None:
        session_dir = tempfile.mkdtemp(prefix="vct-host-")
        atexit.register(shutil.rmtree, session_dir, True)
    session_dir = Path(session_dir)
    redirect_folders(session_dir)

    level = logging.getLogger().level
    run_async(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    logging.getLogger().setLevel(level)

    _ENV = ComfyEnv(
        comfyui_path=path,
        session_dir=session_dir,
        models_dir=session_dir / "models",
        output_dir=session_dir / "output",
        input_dir=session_dir / "input",
        temp_dir=session_dir / "temp",
        user_dir=session_dir / "user",
        custom_nodes_dir=session_dir / "custom_nodes",
        version=version,
    )
    return _ENV


def get_env() -> ComfyEnv:
    """The ComfyEnv of this process (bootstrapping on first use)."""
    return _ENV if _ENV is not None else ensure_bootstrapped()
