"""Validating and running an API prompt in-process with ComfyUI's own executor, for the headless runner
(run_workflow.py beside it): per-node log lines and progress, Ctrl-C as ComfyUI's interrupt, the saved
images' paths as the result; and the executor built the way the running ComfyUI version wants it
(`prompt_executor`, also used by the tests). Nothing from ComfyUI is imported at import time.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import sys
import threading
import uuid
from pathlib import Path

log = logging.getLogger("vct.run_workflow")


class UsageError(Exception):
    """Bad arguments, inputs or workflow, or a prompt ComfyUI refuses (exit code 2)."""


class ExecutionError(Exception):
    """A node raised while the prompt ran (exit code 1)."""


def prompt_executor(execution, server):
    """Return an `execution.PromptExecutor` for `server` with classic (keep everything) caching, on any version."""
    kwargs = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        # 0.38.x reads cache_args["ram"] and ["ram_inactive"] on every prompt; main.py's values for classic
        # caching: no LRU size, no RAM-pressure limits.
        kwargs["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
    return execution.PromptExecutor(server, **kwargs)


def _label(prompt: dict, node_id: str) -> tuple[str, str]:
    """Return a node's class and its title as ` 'title'` when it has one of its own, else ''."""
    node = prompt.get(node_id, {})
    title = node.get("_meta", {}).get("title")
    return node.get("class_type", "?"), (f" {title!r}" if title and title != node.get("class_type") else "")


def validate(prompt: dict) -> list[str]:
    """Return the output node ids to execute, or raise UsageError listing ComfyUI's per-node errors."""
    import execution

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    if ok:
        return outputs
    lines = [f"invalid prompt: {error.get('message')}" + (f": {error['details']}" if error.get("details") else "")]
    for nid, info in node_errors.items():
        label = "".join(_label(prompt, nid)) if nid in prompt else info.get("class_type")
        lines += [f"  node {nid} {label}: {e.get('message')}: {e.get('details')}" for e in info.get("errors", [])]
    raise UsageError("\n".join(lines))


class ProgressServer:
    """The parts of ComfyUI's PromptServer the executor uses; logs a line per node started, records messages."""

    def __init__(self, prompt: dict):
        self.prompt, self.messages, self.started, self.sockets_metadata = prompt, [], 0, {}
        self.client_id = self.last_node_id = self.last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        """Record a message; log a line when a node starts."""
        self.messages.append((event, data))
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
            self.started += 1
            ctype, title = _label(self.prompt, str(data["node"]))
            log.info("[%d/%d] node %s %s%s", self.started, len(self.prompt), data["node"], ctype, title)

    def send_progress_text(self, text, node_id, sid=None):
        """Log a node's progress text."""
        log.info("  node %s: %s", node_id, text)

    def queue_updated(self):
        """Do nothing: there is no queue."""


@contextlib.contextmanager
def _ctrl_c_interrupts():
    """Yield with Ctrl-C asking ComfyUI to stop at its next step (a second Ctrl-C raises KeyboardInterrupt)."""
    import comfy.model_management as mm

    def handler(signum, frame):
        if mm.processing_interrupted():
            raise KeyboardInterrupt
        log.warning("interrupting at the next step (Ctrl-C again to stop at once)")
        mm.interrupt_current_processing(True)

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, handler) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old)
        mm.interrupt_current_processing(False)


def execute(prompt: dict, outputs: list[str]) -> list[Path]:
    """Run a validated prompt with ComfyUI's PromptExecutor; return the absolute paths of the saved images."""
    import comfy.model_management
    import comfy.utils
    import execution
    import folder_paths
    import server
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    progress, reported = ProgressServer(prompt), {}

    def hook(value, total, preview_image, prompt_id=None, node_id=None):  # as main.py's, plus a log line per 10 %
        ctx = get_executing_context()
        node_id = node_id if node_id is not None or ctx is None else ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        if node_id is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)
        if total and int(10 * value / total) > reported.get(node_id, 0):
            reported[node_id] = int(10 * value / total)
            log.info("  node %s: %d/%d", node_id, value, total)

    had_server, old_hook = hasattr(server.PromptServer, "instance"), comfy.utils.PROGRESS_BAR_HOOK
    if not had_server:
        server.PromptServer.instance = progress
    comfy.utils.set_progress_bar_global_hook(hook)
    executor = prompt_executor(execution, progress)
    try:
        with _ctrl_c_interrupts():
            executor.execute(prompt, str(uuid.uuid4()), {"client_id": "vct-run-workflow"}, outputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        if not had_server:
            del server.PromptServer.instance
    events = dict(executor.status_messages)
    if "execution_interrupted" in events:
        raise KeyboardInterrupt
    if "execution_error" in events:
        e = events["execution_error"]
        raise ExecutionError(f"node {e.get('node_id')} ({e.get('node_type')}) failed: "
                             f"{e.get('exception_type')}: {e.get('exception_message')}")
    results = executor.history_result.get("outputs", {})
    return [Path(folder_paths.get_directory_by_type("output"), item.get("subfolder", ""), item["filename"]).resolve()
            for nid in prompt for item in results.get(nid, {}).get("images", []) if item.get("type") == "output"]


if __name__ == "__main__":
    sys.exit(f"{Path(__file__).name} is a module of the headless runner, not a command: "
             f"see python {Path(__file__).with_name('run_workflow.py')} --help")
