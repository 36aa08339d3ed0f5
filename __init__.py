"""ComfyUI-VCT: registers the VCT nodes when loaded by ComfyUI, and nothing else.

Outside ComfyUI (the core tests, scripts using `vct_ops`) this imports cleanly and registers
nothing, so the kernel layer never needs the host.
"""
import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []
