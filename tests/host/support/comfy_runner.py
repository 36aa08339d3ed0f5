"""Running things the way ComfyUI runs them, headless: loading a custom node pack, validating and
executing API-format prompts with ComfyUI's own executor, and (re-exported from the pack's
tools/vct_ui_to_api.py, which owns it) converting UI-format workflows to API prompts.

ComfyUI 0.3.6x signatures this relies on (checked against 0.3.64):
- `async nodes.load_custom_node(module_path, ignore=set(), module_parent="custom_nodes") -> bool`
  (imports the folder's `__init__.py` as a package whose module name is the folder path, then
  registers `NODE_CLASS_MAPPINGS` (V1) or awaits `comfy_entrypoint()` -> `ComfyExtension.get_node_list()` (V3);
  failures are logged, not raised, and give False);
- `async execution.validate_prompt(prompt_id, prompt, partial_execution_list) -> (ok, error, outputs, node_errors)`;
- `execution.PromptExecutor(server, cache_type=False, cache_size=None)` (0.38.x: `cache_args` instead
  of `cache_size`, required; built by the runner's tools/vct_execute.py), sync `.execute(prompt,
  prompt_id, extra_data, execute_outputs)` (runs `execute_async` with `asyncio.run`, everything
  inside `torch.inference_mode()`), results in `.success`, `.status_messages`, `.history_result`.
"""
from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import comfy_env

comfy_env.ensure_bootstrapped()

import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
import execution  # noqa: E402
import server  # noqa: E402
import torch  # noqa: E402
from comfy_execution.utils import get_executing_context  # noqa: E402

import nodes  # noqa: E402

try:  # 0.3.4x+
    from comfy_execution.progress import get_progress_state
except ImportError:  # pragma: no cover
    get_progress_state = None


# ----------------------------------------------------------------------------------------------
# (a) loading a pack
# ----------------------------------------------------------------------------------------------

class PackLoadError(RuntimeError):
    pass


@dataclass
class LoadedPack:
    name: str                 # folder name ComfyUI sees, e.g. "ComfyUI-VCT"
    path: Path                # the folder path given to load_custom_node (a symlink to the source)
    module: Any               # the imported package (sys.modules[str(path)])
    node_ids: list[str]       # node ids registered by this pack, sorted
    log: str                  # what ComfyUI logged while loading

    def node_class(self, node_id: str):
        return nodes.NODE_CLASS_MAPPINGS[node_id]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def load_pack(source: str | os.PathLike = comfy_env.REPO_ROOT, name: str = comfy_env.PACK_NAME,
              custom_nodes_dir: str | os.PathLike | None = None, raise_on_failure: bool = True) -> LoadedPack:
    """Load a custom node folder exactly as ComfyUI's startup does: a symlink `<custom_nodes_dir>/<name>`
    -> `source` (default: this repository as `ComfyUI-VCT` in the session's redirected custom_nodes
    folder), then `nodes.load_custom_node(path, ignore=<built-in node ids>, module_parent="custom_nodes")`.
    Built-in node ids are ignored like `init_external_custom_nodes` does (a pack cannot replace
    core nodes). Returns the node ids whose class now has
    `RELATIVE_PYTHON_MODULE == "custom_nodes.<name>"`. Loading twice re-imports the package and
    re-registers its nodes (fresh class objects)."""
    source = Path(source).resolve()
    cn_dir = Path(custom_nodes_dir) if custom_nodes_dir is not None else comfy_env.get_env().custom_nodes_dir
    cn_dir.mkdir(parents=True, exist_ok=True)
    link = cn_dir / name
    if link.is_symlink() or link.exists():
        if not (link.is_symlink() and link.resolve() == source):
            raise PackLoadError(f"{link} exists and is not a symlink to {source}")
    else:
        link.symlink_to(source, target_is_directory=source.is_dir())

    module_parent = "custom_nodes"
    relative_module = f"{module_parent}.{nodes.get_module_name(str(link))}"
    builtin = {k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
               if not str(getattr(v, "RELATIVE_PYTHON_MODULE", "") or "").startswith("custom_nodes.")}

    capture = _Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    old_level = root.level
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        ok = comfy_env.run_async(nodes.load_custom_node(str(link), ignore=builtin, module_parent=module_parent))
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    log = "\n".join(capture.lines)
    if not ok and raise_on_failure:
        raise PackLoadError(f"ComfyUI could not load {link} -> {source}:\n{log}")
    node_ids = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                      if getattr(v, "RELATIVE_PYTHON_MODULE", None) == relative_module)
    module = sys.modules.get(str(link).replace(".", "_x_"))  # load_custom_node's module name for folders
    return LoadedPack(name=name, path=link, module=module, node_ids=node_ids, log=log)


def encode(clip, text):
    """Return the CONDITIONING CLIPTextEncode gives for `text`."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return [[out.pop("cond"), out]]


class Pack:
    """The loaded pack's node classes and modules."""

    def __init__(self, loaded):
        self.node = {k: nodes.NODE_CLASS_MAPPINGS[k] for k in loaded.node_ids}
        self.vct_ops = loaded.module.vct_ops
        nodes_package = loaded.module.nodes
        self.arch, self.tokens, self.prompts = nodes_package.arch, nodes_package.tokens, nodes_package.prompts
        self.storage = nodes_package.storage
        self.clip_text, self.sd_unet = nodes_package.arch.clip_text, nodes_package.arch.sd_unet
        model = nodes_package.model
        self.identity, self.conditioning, self.controls = model.identity, model.conditioning, model.controls
        self.denoiser, self.training, self.recompute = model.denoiser, model.training, model.recompute

    def run(self, node_id, *args, **kwargs):
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            return self.node[node_id].execute(*args, **kwargs).args


# ----------------------------------------------------------------------------------------------
# (b) validating and executing API prompts
# ----------------------------------------------------------------------------------------------

class PromptValidationError(AssertionError):
    def __init__(self, error: dict, node_errors: dict):
        self.error, self.node_errors = error, node_errors
        lines = [f"{error.get('message')}: {error.get('details')}"]
        for node_id, info in node_errors.items():
            for e in info.get("errors", []):
                lines.append(f"  node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
        super().__init__("\n".join(lines))


class PromptExecutionError(RuntimeError):
    def __init__(self, message: dict):
        self.message = message
        super().__init__(
            f"node {message.get('node_id')} ({message.get('node_type')}) raised {message.get('exception_type')}: "
            f"{message.get('exception_message')}\n{''.join(message.get('traceback') or [])}")


class DummyServer:
    """The parts of `server.PromptServer` the executor, the progress system and core nodes touch.
    Every message is recorded in `.messages` as (event, data); ProgressBar updates in `.progress`
    as (node_id, value, total); `send_progress_text` in `.progress_text`."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []
        self.progress: list[tuple[str | None, float, float]] = []
        self.progress_text: list[tuple[str | None, str]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        self.progress_text.append((node_id, text if isinstance(text, str) else bytes(text).decode(errors="replace")))

    def events(self, name: str) -> list:
        return [d for e, d in self.messages if e == name]


@dataclass
class RunResult:
    prompt_id: str
    success: bool
    outputs: dict                     # history "outputs": {node_id: ui dict}, e.g. {"9": {"images": [...]}}
    status_messages: list             # executor's (event, data) list
    server: DummyServer
    executor: Any
    interrupted: bool = False
    error: dict | None = None         # the "execution_error" message, if any
    validation: tuple | None = None   # validate_prompt's return value

    def output_files(self, node_id: str, key: str = "images") -> list[Path]:
        """Absolute paths of files a SaveImage-like node reported (type output/temp/input)."""
        import folder_paths

        out = []
        for item in self.outputs.get(str(node_id), {}).get(key, []):
            base = folder_paths.get_directory_by_type(item.get("type", "output"))
            out.append(Path(base) / item.get("subfolder", "") / item["filename"])
        return out


def validate_prompt(prompt: dict, prompt_id: str | None = None, partial_execution_list=None):
    """`execution.validate_prompt` (async in this version); returns its 4-tuple."""
    pid = prompt_id or str(uuid.uuid4())
    return comfy_env.run_async(execution.validate_prompt(pid, prompt, partial_execution_list))


def run_prompt(prompt: dict, *, executor=None, extra_data: dict | None = None, prompt_id: str | None = None,
               raise_on_error: bool = True, interrupt_at_progress: int | None = None,
               partial_execution_list=None) -> RunResult:
    """Validate `prompt` (API format) with `execution.validate_prompt`, raising PromptValidationError
    with ComfyUI's per-node messages if invalid; then run it through `execution.PromptExecutor`
    (new one, i.e. empty caches, unless `executor` is given - reuse one to test caching) with a
    DummyServer, like main.py's prompt worker. A ProgressBar hook like main.py's is installed for
    the run: it raises ComfyUI's InterruptProcessingException when an interrupt is pending and
    records progress; `interrupt_at_progress=N` requests an interrupt at the N-th update (to test
    cancellation). Node errors raise PromptExecutionError unless `raise_on_error=False`; an
    interrupt never raises (see `.interrupted`)."""
    prompt_id = prompt_id or str(uuid.uuid4())
    valid = validate_prompt(prompt, prompt_id, partial_execution_list)
    if not valid[0]:
        raise PromptValidationError(valid[1], valid[3])
    outputs_to_execute = valid[2]

    dummy = executor.server if executor is not None else DummyServer()
    if executor is None:
        executor = run_workflow.running.prompt_executor(execution, dummy)
    extra = {"client_id": "vct-host-tests"}
    extra.update(extra_data or {})
    dummy.last_prompt_id = prompt_id
    n_updates = [0]

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        n_updates[0] += 1
        if interrupt_at_progress is not None and n_updates[0] == interrupt_at_progress:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()
        dummy.progress.append((node_id, value, total))
        if get_progress_state is not None and node_id is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)

    old_hook = comfy.utils.PROGRESS_BAR_HOOK
    had_instance = hasattr(server.PromptServer, "instance")
    old_instance = getattr(server.PromptServer, "instance", None)
    comfy.utils.set_progress_bar_global_hook(hook)
    if not had_instance:
        server.PromptServer.instance = dummy
    try:
        executor.execute(prompt, prompt_id, extra, outputs_to_execute)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        comfy.model_management.interrupt_current_processing(False)
        if not had_instance:
            del server.PromptServer.instance
        else:
            server.PromptServer.instance = old_instance

    status = list(executor.status_messages)
    error = next((d for e, d in status if e == "execution_error"), None)
    interrupted = any(e == "execution_interrupted" for e, _ in status)
    result = RunResult(prompt_id=prompt_id, success=bool(executor.success) and not interrupted,
                       outputs=dict(executor.history_result.get("outputs", {})), status_messages=status,
                       server=dummy, executor=executor, interrupted=interrupted, error=error, validation=valid)
    if error is not None and raise_on_error:
        raise PromptExecutionError(error)
    return result


# ----------------------------------------------------------------------------------------------
# (c) UI workflow -> API prompt: owned by the product, tools/run_workflow.py (not a package,
#     so loaded from its file); re-exported here under the names the tests use
# ----------------------------------------------------------------------------------------------

def _load_run_workflow():
    """The pack's tools/run_workflow.py as a module (registered as `vct_run_workflow`)."""
    import importlib.util

    name = "vct_run_workflow"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, comfy_env.REPO_ROOT / "tools" / "run_workflow.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run_workflow = _load_run_workflow()
_conversion = run_workflow.conversion  # tools/vct_ui_to_api.py, as the runner loaded it
node_info, widget_layout = _conversion.node_info, _conversion.widget_layout
_assign_widget_values, ui_to_api = _conversion._assign_widget_values, _conversion.ui_to_api
set_inputs, api_prompt_from_file = _conversion.set_inputs, _conversion.api_prompt_from_file


__all__ = [
    "LoadedPack", "PackLoadError", "load_pack", "Pack", "encode", "PromptValidationError", "PromptExecutionError",
    "DummyServer", "RunResult", "validate_prompt", "run_prompt", "node_info", "widget_layout",
    "ui_to_api", "set_inputs", "api_prompt_from_file", "run_workflow",
]
