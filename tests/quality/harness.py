"""The toy world's task set, run through the real nodes in ComfyUI's executor and scored.

One API prompt per task holds every method as a branch of one graph: ComfyUI computes the shared
nodes (DDIM inversion, null-text inversion, concept learning) once and each method's own nodes
after them. A server stand-in times every node and counts the UNet rows it ran (forward only,
and forward+backward), so a method's cost is the sum over the nodes it depends on.

Methods (`METHODS`): VCT with the paper's defaults and its ablations, the content-inversion
methods, the equaliser positions, and baselines made of ComfyUI's own nodes (KSampler and
KSamplerAdvanced). Scores per task and method (`score`): structure (mask IoU with the source),
concept (the reference's colour and texture recognised in the output), and their product.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import toy_model  # bootstraps ComfyUI and puts tests/host on sys.path
import world
from PIL import Image

# isort: split
import comfy_runner
import execution

TOY_CKPT = "vct_toy_world.safetensors"


# ----------------------------------------------------------------------------------------------
# the task set
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A source whose structure must be kept and a reference whose colour and texture must be taken."""

    index: int
    source: world.Scene
    reference: world.Scene

    @property
    def name(self) -> str:
        """Return a short label, e.g. '03 red striped circle <- blue square'."""
        s, r = self.source, self.reference
        return f"{self.index:02d} {s.caption()[2:]} <- {r.caption()[2:]}"


def task_set(count: int = 24, seed: int = 2024) -> list[Task]:
    """Return `count` pairs: every reference differs from its source in colour, position and size, two in three
    in texture, one in two in shape."""
    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(count):
        source = world.random_scene(rng, radius=float(rng.uniform(4.5, 6.0)))
        colour = str(rng.choice([c for c in world.COLOURS if c != source.colour]))
        texture = source.texture if i % 3 == 0 else str(rng.choice([t for t in world.TEXTURES if t != source.texture]))
        shape = str(rng.choice([s for s in world.SHAPES if s != source.shape])) if i % 2 == 0 else source.shape
        reference = world.random_scene(rng, colour=colour, texture=texture, shape=shape)
        tasks.append(Task(i, source, reference))
    return tasks


# ----------------------------------------------------------------------------------------------
# settings: the paper's defaults, at the world's size
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Every knob of the pipeline; the defaults are the paper's (see README, 'Does it work?')."""

    steps: int = 50
    cfg: float = 7.5
    inner_steps: int = 50
    early_stop: float = 1e-5
    num_vectors: int = 3
    concept_steps: int = 500
    learning_rate: float = 5e-4
    grad_accum: int = 4
    l1_weight: float = 1.0
    # A word no caption uses: the learned vectors must find colour and texture themselves.
    initializer: str = "object"
    self_injection: float = 0.9
    cross_injection: float = 0.2
    concept_weight: float = 0.5
    equalizer: str = "concept_tokens"
    seed: int = 0
    concept_samples: int = 8


# ----------------------------------------------------------------------------------------------
# graph building
# ----------------------------------------------------------------------------------------------

class Graph:
    """An API-format prompt under construction, with readable node ids."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, node_id: str, class_type: str, **inputs) -> str:
        """Add a node (once; the same id twice must mean the same node) and return its id."""
        node = {"class_type": class_type, "inputs": inputs}
        if node_id in self.nodes and self.nodes[node_id] != node:
            raise ValueError(f"node id {node_id} is used for two different nodes")
        self.nodes[node_id] = node
        return node_id

    def ancestors(self, node_id: str) -> set[str]:
        """Return the node and every node it depends on."""
        seen, stack = set(), [node_id]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            for value in self.nodes[current]["inputs"].values():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    stack.append(value[0])
        return seen


def out(node_id: str, index: int = 0) -> list:
    """Return an API-format link to output `index` of a node."""
    return [node_id, index]


@dataclass
class Method:
    """A way to translate: the node whose LATENT output is the result, and where B* is (if any)."""

    name: str
    result: str
    reconstruction: Optional[str] = None
    group: str = "main"


MODEL, CLIP, VAE = out("ckpt", 0), out("ckpt", 1), out("ckpt", 2)


def _base(g: Graph, task: Task, s: Settings, images: dict) -> None:
    g.add("ckpt", "CheckpointLoaderSimple", ckpt_name=TOY_CKPT)
    g.add("src_img", "LoadImage", image=images["source"])
    g.add("ref_img", "LoadImage", image=images["reference"])
    g.add("src_lat", "VAEEncode", pixels=out("src_img"), vae=VAE)
    g.add("ref_lat", "VAEEncode", pixels=out("ref_img"), vae=VAE)
    g.add("empty", "CLIPTextEncode", text="", clip=CLIP)
    g.add("ddim", "VCTDDIMInvert", model=MODEL, latent=out("src_lat"), conditioning=out("empty"), steps=s.steps)


def _null(g: Graph, s: Settings, method: str = "null_text", inner_steps: Optional[int] = None,
          inversion: str = "ddim", negative: Optional[str] = None, suffix: str = "") -> str:
    inner = s.inner_steps if inner_steps is None else inner_steps
    node_id = f"null_{method}{suffix}" if inner == s.inner_steps else f"null_{method}_{inner}{suffix}"
    inputs = dict(model=MODEL, inversion=out(inversion), cfg=s.cfg, inner_steps=inner, early_stop=s.early_stop,
                  method=method)
    if negative is not None:
        inputs["negative"] = out(negative)
    return g.add(node_id, "VCTNullTextInvert", **inputs)


def _concept(g: Graph, s: Settings, steps: Optional[int] = None, model: list = MODEL, suffix: str = "") -> str:
    steps = s.concept_steps if steps is None else steps
    node_id = "concept" if steps == s.concept_steps else f"concept_{steps}"
    return g.add(node_id + suffix, "VCTConceptLearn", model=model, clip=CLIP, latent=out("ref_lat"),
                 initializer=s.initializer, num_vectors=s.num_vectors, steps=steps, learning_rate=s.learning_rate,
                 grad_accum=s.grad_accum, l1_weight=s.l1_weight, seed=s.seed, embedding_name="", overwrite=False)


def _sampler(g: Graph, node_id: str, s: Settings, null: str, concept: list, model: list = MODEL, **overrides) -> str:
    inputs = dict(model=model, inversion=out(null), concept=concept, cfg=s.cfg, self_injection=s.self_injection,
                  cross_injection=s.cross_injection, concept_weight=s.concept_weight, concept_tokens=0,
                  equalizer=s.equalizer)
    inputs.update(overrides)
    return g.add(node_id, "VCTDualBranchSampler", **inputs)


def caption_tokens(clip, text: str) -> int:
    """Return how many word tokens a prompt has (the start and end tokens not counted)."""
    tokens = clip.tokenize(text)["l"][0]
    special = {49406, 49407}
    return sum(1 for t, *_ in tokens if t not in special)


def build(task: Task, s: Settings, images: dict, groups: tuple[str, ...] = ("main",), text_tokens: int = 4
          ) -> tuple[Graph, list[Method]]:
    """Return the graph of every method of the given groups ('main', 'cost', 'reconstruction') for one task."""
    g = Graph()
    _base(g, task, s, images)
    methods: list[Method] = []
    null = _null(g, s)
    concept = _concept(g, s)
    learned = out(concept)
    if "main" in groups:
        methods.append(Method("vct", _sampler(g, "vct", s, null, learned), reconstruction="vct"))
        methods.append(Method("no self-injection", _sampler(g, "no_self", s, null, learned, self_injection=0.0)))
        methods.append(Method("no cross-injection", _sampler(g, "no_cross", s, null, learned, cross_injection=0.0)))
        methods.append(Method("no injection", _sampler(g, "no_inject", s, null, learned, self_injection=0.0,
                                                       cross_injection=0.0)))
        for tau in (0.3, 0.6, 1.0):
            methods.append(Method(f"tau_self {tau}", _sampler(g, f"tau_{tau}", s, null, learned,
                                                              self_injection=tau), group="sweep"))
        other = "reference_code" if s.equalizer == "concept_tokens" else "concept_tokens"
        methods.append(Method(f"equalizer {other}", _sampler(g, "eq_other", s, null, learned, equalizer=other)))
        for method in ("negative_prompt", "direct"):
            sampler = _sampler(g, f"vct_{method}", s, _null(g, s, method), learned)
            methods.append(Method(f"content {method}", sampler, reconstruction=sampler))
        g.add("caption", "CLIPTextEncode", text=task.reference.caption(), clip=CLIP)
        methods.append(Method("text caption (VCT)", _sampler(g, "text", s, null, out("caption"),
                                                             concept_tokens=text_tokens), group="baseline"))
        g.add("plain", "KSamplerAdvanced", model=MODEL, add_noise="disable", noise_seed=s.seed, steps=s.steps,
              cfg=s.cfg, sampler_name="ddim", scheduler="ddim_uniform", positive=learned, negative=out("empty"),
              latent_image=out("ddim", 1), start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
        methods.append(Method("plain CFG from z*_T", "plain", group="baseline"))
        for strength in (0.5, 0.75):
            node = g.add(f"sdedit_{strength}", "KSampler", model=MODEL, seed=s.seed, steps=s.steps, cfg=s.cfg,
                         sampler_name="ddim", scheduler="ddim_uniform", positive=learned, negative=out("empty"),
                         latent_image=out("src_lat"), denoise=strength)
            methods.append(Method(f"SDEdit {strength}", node, group="baseline"))
        g.add("blank", "EmptyLatentImage", width=8 * world.SIDE, height=8 * world.SIDE, batch_size=s.concept_samples)
        g.add("samples", "KSampler", model=MODEL, seed=s.seed, steps=s.steps, cfg=s.cfg, sampler_name="ddim",
              scheduler="ddim_uniform", positive=learned, negative=out("empty"), latent_image=out("blank"), denoise=1.0)
        methods.append(Method("concept samples", "samples", group="samples"))
    if "cost" in groups:
        for steps in (100, 250):
            c = _concept(g, s, steps=steps)
            methods.append(Method(f"concept {steps} steps", _sampler(g, f"vct_c{steps}", s, null, out(c)),
                                  group="cost"))
        inner = _null(g, s, inner_steps=10)
        methods.append(Method("null-text 10 inner steps", _sampler(g, "vct_inner10", s, inner, learned),
                              reconstruction="vct_inner10", group="cost"))
        g.add("bf16", "ModelComputeDtype", model=MODEL, dtype="bf16")
        c = _concept(g, s, model=out("bf16"), suffix="_bf16")
        n = g.add("null_bf16", "VCTNullTextInvert", model=out("bf16"), inversion=out("ddim"), cfg=s.cfg,
                  inner_steps=s.inner_steps, early_stop=s.early_stop, method="null_text")
        methods.append(Method("bfloat16 training", _sampler(g, "vct_bf16", s, n, out(c)), reconstruction="vct_bf16",
                              group="cost"))
    if "sequential" in groups:  # run with `sequential_accumulation` in a fresh executor (its cache would answer)
        methods.append(Method("sequential accumulation", _sampler(g, "vct", s, null, learned), reconstruction="vct",
                              group="cost"))
    if "reconstruction" in groups:
        # The null-text inversion paper's setting: the source's caption as the source prompt, "" as
        # the untuned null embedding; B* with null-text against plain CFG with the untuned null.
        g.add("src_caption", "CLIPTextEncode", text=task.source.caption(), clip=CLIP)
        g.add("ddim_caption", "VCTDDIMInvert", model=MODEL, latent=out("src_lat"), conditioning=out("src_caption"),
              steps=s.steps)
        tuned = _null(g, s, inversion="ddim_caption", negative="empty", suffix="_caption")
        methods.append(Method("caption prompt, null-text", _sampler(g, "rec_tuned", s, tuned, learned),
                              reconstruction="rec_tuned", group="reconstruction"))
        g.add("rec_untuned", "KSamplerAdvanced", model=MODEL, add_noise="disable", noise_seed=s.seed, steps=s.steps,
              cfg=s.cfg, sampler_name="ddim", scheduler="ddim_uniform", positive=out("src_caption"),
              negative=out("empty"), latent_image=out("ddim_caption", 1), start_at_step=0, end_at_step=10000,
              return_with_leftover_noise="disable")
        methods.append(Method("caption prompt, untuned null", "rec_untuned", reconstruction="rec_untuned",
                              group="reconstruction"))
    return g, methods


def add_previews(g: Graph, methods: list[Method]) -> dict[tuple[str, str], str]:
    """Decode every result (and B*) to a PreviewImage; return {(method name, 'result'|'reconstruction'): node id}."""
    previews = {}
    for m in methods:
        for kind, (node, index) in (("result", (m.result, 0)), ("reconstruction", (m.reconstruction, 1))):
            if node is None:
                continue
            if node.startswith("rec_untuned") and kind == "reconstruction":
                index = 0
            decode = g.add(f"decode_{node}_{index}", "VAEDecode", samples=out(node, index), vae=VAE)
            previews[(m.name, kind)] = g.add(f"preview_{node}_{index}", "PreviewImage", images=out(decode))
    return previews


# ----------------------------------------------------------------------------------------------
# running: per-node time and UNet rows
# ----------------------------------------------------------------------------------------------

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
        self.executor = comfy_runner.run_workflow.load_compat().prompt_executor(execution, self.server)

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


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------

CONCEPT_ATTRIBUTES = ("colour", "texture")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Return the PSNR in dB of two images in [0, 1]."""
    mse = float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def score_image(image: np.ndarray, task: Task) -> dict:
    """Return structure, concept and their product for one output of a task, plus what was recognised."""
    found = world.analyse(image)
    structure = world.iou(found.mask, world.true_mask(task.source))
    hits = [found.attributes()[a] == task.reference.attributes()[a] for a in CONCEPT_ATTRIBUTES]
    concept = float(np.mean(hits))
    return {"structure": structure, "concept": concept, "both": float(all(hits)), "score": structure * concept,
            "shape_kept": float(found.shape == task.source.shape), "found": found.attributes()}


def method_cost(outcome: Outcome, method: Method) -> dict:
    """Return the seconds and UNet rows of every node a method depends on."""
    total = {"seconds": 0.0, "forward": 0, "train": 0}
    for node in outcome.graph.ancestors(method.result):
        for key in total:
            total[key] += outcome.costs.get(node, {}).get(key, 0)
    return total


def score(outcome: Outcome) -> dict[str, dict]:
    """Return, per method, the mean scores over its images, B*'s PSNR where it has one, and its cost."""
    source = world.render(outcome.task.source)
    rows = {}
    for m in outcome.methods:
        images = outcome.images.get((m.name, "result"))
        if images is None:
            continue
        per = [score_image(img, outcome.task) for img in images]
        row = {key: float(np.mean([p[key] for p in per])) for key in ("structure", "concept", "both", "score",
                                                                        "shape_kept")}
        row["found"] = per[0]["found"]
        rec = outcome.images.get((m.name, "reconstruction"))
        if rec is not None:
            row["psnr"] = psnr(rec[0], source)
        row.update(method_cost(outcome, m))
        rows[m.name] = row
    return rows


def settings_with(**changes) -> Settings:
    """Return the default settings with some fields changed."""
    return replace(Settings(), **changes)


@contextlib.contextmanager
def sequential_accumulation(host_module):
    """Within the block, Concept Learn runs its accumulated samples one model pass each, as when memory is short.

    `host_module` is the loaded pack's `nodes.host`; its memory check is answered "no" for fused
    batches (and left alone for one-row passes, so nothing is recomputed in backward).
    """
    original = host_module.training_fits
    host_module.training_fits = lambda model, shape: shape[0] == 1 and original(model, shape)
    try:
        yield
    finally:
        host_module.training_fits = original


@contextlib.contextmanager
def toy_checkpoint(env, counter: PassCounter, weights: Optional[Path] = None):
    """Within the block, CheckpointLoaderSimple's `TOY_CKPT` loads the trained toy model (with `counter` on its UNet).

    The weights file is linked into the session's checkpoints folder; ComfyUI's checkpoint loader
    function is wrapped by the host tier's checkpoint-loader patch for the block only.
    """
    import comfy.sd
    import comfy_tiny_checkpoint

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
