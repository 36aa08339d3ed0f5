"""Progress bars that are cancellation points, and the server the nodes report to."""
from __future__ import annotations

from typing import Callable

import comfy.model_management
import comfy.utils
import torch


def prompt_server():
    """Return ComfyUI's running PromptServer, or None where there is none (headless tools, tests)."""
    import server

    return getattr(server.PromptServer, "instance", None)


class Progress:
    """A ComfyUI progress bar that is also a cancellation point."""

    def __init__(self, total: int) -> None:
        """Start a bar of `total` units."""
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, done: int, total: int, preview=None) -> None:
        """Report `done` of `total`; raise if the user cancelled the run."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, total, preview)


def step_callback(progress: Progress) -> Callable[[int, int, torch.Tensor], None]:
    """Return a kernel step callback that reports progress."""
    return lambda step, total, x: progress(step, total)
