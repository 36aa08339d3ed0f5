"""Running the toy world's task graphs (harness.py) through one PromptExecutor: each node's wall time
and UNet rows (forward only, and forward with gradients), the decoded previews, and the trained toy
checkpoint served to CheckpointLoaderSimple.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import toy_model  # bootstraps ComfyUI and puts tests/host on sys.path
import world
from harness import TOY_CKPT, Graph, Method, Settings, Task, add_previews, build
from PIL import Image

# isort: split
import execution
from support import comfy_runner


class PassCounter:
    """Counts the UNet rows run forward only and forward with gradients (followed by a backward)."""

    def __init__(self) -> None:
        self.forward = 0
        self.train = 0

    def hook(self, module, args, kwargs, output) -> None:
        """Forward hook on the UNet: add the call's rows to the right count."""
        rows = output.shape[0]
        if torch.is_grad_enabled():
            self.train += rows
        else:
            self.forward += rows

    def snapshot(self) -> tuple[int, int]:
        """Return (forward rows, forward+backward rows) so far."""
        return self.forward, self.train


class ToyLoader:
    """Loads the toy checkpoint for the host tier's checkpoint-loader patch, with a pass counter on the UNet."""

    def __init__(self, counter: PassCounter) -> None:
        self.counter = counter

    def __call__(self, path, marker, embedding_directory, output_model=True, output_clip=True, output_vae=True):
        """Return (model, clip, vae) as a checkpoint loader does."""
        model, clip, vae = toy_model.toy_checkpoint_loader(path, marker, embedding_directory, output_model,
                                                           output_clip, output_vae)
        if model is not None:
            model.model.diffusion_model.register_forward_hook(self.counter.hook, with_kwargs=True)
        return model, clip, vae


class TimedServer(comfy_runner.DummyServer):
    """A server stand-in that also records, for every node that runs, its wall time and UNet rows."""

    def __init__(self, counter: PassCounter) -> None:
        super().__init__()
        self.counter = counter
        self.current: Optional[tuple[str, float, tuple[int, int]]] = None
        self.costs: dict[str, dict] = {}

    def send_sync(self, event, data, sid=None):
        """Record the message; on every 'executing' message, close the running node's account."""
        super().send_sync(event, data, sid)
        if event != "executing":
            return
        now, counts = time.perf_counter(), self.counter.snapshot()
        if self.current is not None:
            node, start, before = self.current
            self.costs[node] = {"seconds": now - start, "forward": counts[0] - before[0],
                                "train": counts[1] - before[1]}
        node = data.get("node") if isinstance(data, dict) else None
        self.current = (node, now, counts) if node is not None else None


@dataclass
class Outcome:
    """What one task's run gave: world images per (method, kind), node costs, and the graph."""

    task: Task
    images: dict
    costs: dict
    graph: Graph
    methods: list[Method]
    seconds: float = 0.0


def write_inputs(task: Task, input_dir: Path) -> dict:
    """Write the task's source and reference as PNGs into ComfyUI's input folder; return their names."""
    names = {}
    for kind, scene in (("source", task.source), ("reference", task.reference)):
        name = f"vct_toy_{task.index:02d}_{kind}.png"
        pixels = toy_model.to_pixels(world.render(scene))[0].numpy()
        Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(input_dir / name)
        names[kind] = name
    return names


def read_image(path: Path) -> np.ndarray:
    """Return the world image `[S, S, 3]` of a saved preview PNG."""
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)[None]
    return toy_model.from_pixels(pixels)


class Runner:
    """Runs tasks through one PromptExecutor (its cache keeps the checkpoint loaded across tasks)."""

    def __init__(self, input_dir: Path, counter: PassCounter) -> None:
        self.input_dir = Path(input_dir)
        self.server = TimedServer(counter)
        self.executor = comfy_runner.run_workflow.running.prompt_executor(execution, self.server)

    def run(self, task: Task, settings: Settings = Settings(), groups: tuple[str, ...] = ("main",),
            text_tokens: int = 4) -> Outcome:
        """Run every method of `groups` on one task; return the decoded images and the node costs."""
        images = write_inputs(task, self.input_dir)
        graph, methods = build(task, settings, images, groups, text_tokens)
        previews = add_previews(graph, methods)
        self.server.costs = {}
        start = time.perf_counter()
        result = comfy_runner.run_prompt(graph.nodes, executor=self.executor)
        seconds = time.perf_counter() - start
        decoded = {}
        for key, node in previews.items():
            files = result.output_files(node)
            decoded[key] = np.stack([read_image(f) for f in files]) if files else None
        return Outcome(task, decoded, dict(self.server.costs), graph, methods, seconds)




@contextlib.contextmanager
def sequential_accumulation(training_module):
    """Within the block, Concept Learn runs its accumulated samples one model pass each, as when memory is short.

    `training_module` is the loaded pack's `nodes.model.training`; its memory check is answered "no"
    for fused batches (and left alone for one-row passes, so nothing is recomputed in backward).
    """
    original = training_module.training_fits
    training_module.training_fits = lambda model, shape: shape[0] == 1 and original(model, shape)
    try:
        yield
    finally:
        training_module.training_fits = original


@contextlib.contextmanager
def appearance_settings(vct_ops_module, **fields):
    """Within the block, the sampler's appearance attention runs with `fields` of vct_ops.AppearanceConfig changed
    (layers, queries, temperature: settings the node does not expose). `vct_ops_module` is the loaded pack's."""
    original = vct_ops_module.AppearanceConfig
    vct_ops_module.AppearanceConfig = functools.partial(original, **fields)
    try:
        yield
    finally:
        vct_ops_module.AppearanceConfig = original


@contextlib.contextmanager
def toy_checkpoint(env, counter: PassCounter, weights: Optional[Path] = None):
    """Within the block, CheckpointLoaderSimple's `TOY_CKPT` loads the trained toy model (with `counter` on its UNet).

    The weights file is linked into the session's checkpoints folder; ComfyUI's checkpoint loader
    function is wrapped by the host tier's checkpoint-loader patch for the block only.
    """
    import comfy.sd
    from support import comfy_tiny_checkpoint

    weights = Path(weights) if weights is not None else toy_model.weights_path()
    link = env.folder("checkpoints") / TOY_CKPT
    link.unlink(missing_ok=True)
    link.symlink_to(weights.resolve())
    original = comfy.sd.load_checkpoint_guess_config
    patch = comfy_tiny_checkpoint.TinyCheckpointPatch(original, {"toy": ToyLoader(counter)})
    comfy.sd.load_checkpoint_guess_config = patch
    try:
        yield link
    finally:
        comfy.sd.load_checkpoint_guess_config = original
        link.unlink(missing_ok=True)
