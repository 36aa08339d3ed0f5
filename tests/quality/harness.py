"""The toy world's task set, and the graph of the real nodes that runs every method on one task.

One API prompt per task holds every method as a branch of one graph: ComfyUI computes the shared
nodes (DDIM inversion, null-text inversion, concept learning) once and each method's own nodes
after them, so a method's cost is the sum over the nodes it depends on.

Methods (`METHODS`): VCT with the paper's defaults and its ablations, the content-inversion
methods, the equaliser positions, and baselines made of ComfyUI's own nodes (KSampler and
KSamplerAdvanced), and reference appearance attention alone, with the concept, and as a fast
preset (group "appearance"). running.py runs the graphs in ComfyUI's executor, timing every node and
counting its UNet rows; scoring.py scores their outcomes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import world

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
    # Prompt-to-prompt's local blend threshold (the sampler's default; 0 is the paper's VCT).
    local_blend: float = 0.3
    seed: int = 0
    concept_samples: int = 8
    # The toy model's family: "sd15" (the UNet) or "sd3" (the joint-attention transformer).
    family: str = "sd15"
    # The sampler's joint_blocks for the SD3 toy's rows ("all": as the table's rows were measured).
    joint_blocks: str = "all"


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
                  equalizer=s.equalizer, local_blend=s.local_blend)
    if s.family != "sd15":
        inputs["joint_blocks"] = s.joint_blocks
    inputs.update(overrides)
    return g.add(node_id, "VCTDualBranchSampler", **inputs)


def caption_tokens(clip, text: str) -> int:
    """Return how many word tokens a prompt has (the start and end tokens not counted)."""
    tokens = clip.tokenize(text)["l"][0]
    special = {49406, 49407}
    return sum(1 for t, *_ in tokens if t not in special)


def build(task: Task, s: Settings, images: dict, groups: tuple[str, ...] = ("main",), text_tokens: int = 4
          ) -> tuple[Graph, list[Method]]:
    """Return the graph of every method of the given groups for one task ('main', 'appearance', 'study', 'cast',
    'blend', 'fast' or only its 'fast_preset', 'cost', 'reconstruction', 'sequential', 'blocks')."""
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
        if s.family == "sd15":
            g.add("caption", "CLIPTextEncode", text=task.reference.caption(), clip=CLIP)
            caption = dict(concept_tokens=text_tokens)
        else:  # T5 prompts record their layout through VCT Concept Prompt (concept_tokens is CLIP's)
            g.add("caption", "VCTConceptPrompt", clip=CLIP, text=task.reference.caption())
            caption = {}
        methods.append(Method("text caption (VCT)", _sampler(g, "text", s, null, out("caption"), **caption),
                              group="baseline"))
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
    if "blocks" in groups:  # the joint-attention transformer: which blocks take B*'s attention
        for choice in JOINT_BLOCKS:
            methods.append(Method(f"joint blocks {choice}", _sampler(g, f"blocks_{choice}", s, null, learned,
                                                                     joint_blocks=choice), group="blocks"))
    if "appearance" in groups:
        methods += appearance_methods(g, s, null, learned, with_vct="main" not in groups)
    if "study" in groups:  # one cheap configuration, rerun under other kernel settings (layers, queries)
        g.add("ref_ddim", "VCTDDIMInvert", model=MODEL, latent=out("ref_lat"), conditioning=out("empty"),
              steps=s.steps)
        node = _sampler(g, "study", s, _null(g, s, "direct"), out("empty"), reference=out("ref_ddim"),
                        appearance_strength=1.0, appearance_window=1.0)
        methods.append(Method("study", node, group="study"))
    if "cast" in groups:  # where the background cast comes from: guidance, equaliser, the concept itself
        direct = _null(g, s, "direct")
        for scale in (1.0, 3.0):
            node = _sampler(g, f"cast_cfg_{scale}", s, direct, learned, cfg=scale)
            methods.append(Method(f"cast: direct, cfg {scale:g}", node, group="cast"))
        methods.append(Method("cast: no equaliser (weight 1)", _sampler(g, "cast_eq1", s, null, learned,
                                                                         concept_weight=1.0), group="cast"))
        methods.append(Method("cast: source prompt as concept (B = B*)", _sampler(g, "cast_same", s, null,
                                                                                   out("empty")), group="cast"))
    if "blend" in groups:  # local blend on VCT's defaults: the background kept by B*'s latent
        for threshold in BLEND_THRESHOLDS:
            node = _sampler(g, f"blend_{threshold}", s, null, learned, local_blend=threshold)
            label = "VCT without local blend (the paper's)" if threshold == 0 else f"VCT, local blend {threshold}"
            methods.append(Method(label, node, group="blend"))
    if "fast" in groups:
        methods += fast_methods(g, s, null, learned, with_vct="main" not in groups and "appearance" not in groups)
    elif "fast_preset" in groups:  # the preset and appearance attention without a concept (the host tier's)
        methods += fast_methods(g, s, null, learned, with_vct=False, presets=(FAST_PRESET, APPEARANCE_FAST))
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


# The sampler's joint_blocks choices measured beside its default ("all") on the transformer.
JOINT_BLOCKS = ("first_half", "second_half")
# The measured rows of the SD3 toy ran with every block; the sampler's default there is "auto".


# Appearance attention without a learned concept: (strength, window) of the sampler's inputs.
APPEARANCE_ALONE = ((0.5, 1.0), (1.0, 1.0), (1.0, 0.5))
# With the learned concept (500 steps): (strength, window).
APPEARANCE_WITH_CONCEPT = ((0.5, 1.0), (1.0, 1.0))


def appearance_methods(g: Graph, s: Settings, null: str, learned: list, with_vct: bool = True) -> list[Method]:
    """Add reference appearance attention (the reference DDIM-inverted with the empty prompt, B* by direct
    inversion) alone and with the learned concept; return the methods (group 'appearance')."""
    methods = []
    if with_vct:
        methods.append(Method("vct", _sampler(g, "vct", s, null, learned), reconstruction="vct"))
    g.add("ref_ddim", "VCTDDIMInvert", model=MODEL, latent=out("ref_lat"), conditioning=out("empty"), steps=s.steps)
    direct = _null(g, s, "direct")
    if with_vct:
        methods.append(Method("content direct", _sampler(g, "vct_direct", s, direct, learned),
                              reconstruction="vct_direct"))

    def appearance(node_id: str, concept: list, strength: float, window: float) -> str:
        return _sampler(g, node_id, s, direct, concept, reference=out("ref_ddim"), appearance_strength=strength,
                        appearance_window=window)

    for strength, window in APPEARANCE_ALONE:
        node = appearance(f"app_{strength}_{window}", out("empty"), strength, window)
        methods.append(Method(f"appearance {strength} w{window}, no concept", node, reconstruction=node,
                              group="appearance"))
    for strength, window in APPEARANCE_WITH_CONCEPT:
        node = appearance(f"app_c_{strength}_{window}", learned, strength, window)
        methods.append(Method(f"appearance {strength} w{window} + concept", node, group="appearance"))
    return methods


# Local blend thresholds measured beside VCT's defaults (0: the paper's VCT, without it).
BLEND_THRESHOLDS = (0.0, 0.5)


@dataclass(frozen=True)
class Fast:
    """A fast configuration: sampling steps, a short concept run (0 steps: none), appearance and local blend."""

    label: str
    steps: int = 25
    concept_steps: int = 50
    learning_rate: float = 2e-3
    grad_accum: int = 1
    appearance: float = 0.0
    local_blend: float = 0.0


# The fast preset (the shipped template "VCT fast translation") first, then what it was chosen against.
FAST_PRESET = Fast("fast preset: 25 steps, concept 60 x1 lr 5e-3", concept_steps=60, learning_rate=5e-3,
                   local_blend=0.3)
# Appearance attention in place of the concept: no per-image optimisation at all.
APPEARANCE_FAST = Fast("fast: 25 steps, appearance 0.5, no concept", concept_steps=0, appearance=0.5, local_blend=0.3)
FAST = (
    FAST_PRESET,
    Fast("fast: preset without local blend", concept_steps=60, learning_rate=5e-3),
    Fast("fast: 25 steps, concept 35 x1 lr 1e-2", concept_steps=35, learning_rate=1e-2, local_blend=0.3),
    Fast("fast: 25 steps, concept 50 x1 lr 2e-3", concept_steps=50, learning_rate=2e-3, local_blend=0.3),
    APPEARANCE_FAST,
    Fast("fast: preset + appearance 0.5", concept_steps=60, learning_rate=5e-3, appearance=0.5, local_blend=0.3),
    Fast("fast: concept 35 x1 lr 1e-2 + appearance 0.5", concept_steps=35, learning_rate=1e-2, appearance=0.5,
         local_blend=0.3),
)


def fast_methods(g: Graph, s: Settings, null: str, learned: list, with_vct: bool = True,
                 presets: Optional[tuple] = None) -> list[Method]:
    """Add the fast configurations (default: FAST; each with `direct` content inversion at its own step count);
    return the methods (group 'fast')."""
    presets = FAST if presets is None else presets
    methods = []
    if with_vct:
        methods.append(Method("vct", _sampler(g, "vct", s, null, learned), reconstruction="vct"))
    for i, f in enumerate(presets):
        fs = replace(s, steps=f.steps, concept_steps=f.concept_steps, learning_rate=f.learning_rate,
                     grad_accum=f.grad_accum)
        ddim = "ddim" if f.steps == s.steps else g.add(f"ddim_{f.steps}", "VCTDDIMInvert", model=MODEL,
                                                       latent=out("src_lat"), conditioning=out("empty"), steps=f.steps)
        direct = g.add(f"direct_{f.steps}", "VCTNullTextInvert", model=MODEL, inversion=out(ddim), cfg=s.cfg,
                       inner_steps=s.inner_steps, early_stop=s.early_stop, method="direct")
        if f.concept_steps:
            concept = out(_concept(g, fs, suffix=f"_fast_{f.concept_steps}_{f.learning_rate}_{f.grad_accum}"))
        else:
            concept = out("empty")
        extra = {}
        if f.appearance:
            ref = g.add(f"ref_ddim_{f.steps}", "VCTDDIMInvert", model=MODEL, latent=out("ref_lat"),
                        conditioning=out("empty"), steps=f.steps)
            extra = dict(reference=out(ref), appearance_strength=f.appearance, appearance_window=1.0)
        extra["local_blend"] = f.local_blend
        methods.append(Method(f.label, _sampler(g, f"fast_{i}", s, direct, concept, **extra), group="fast"))
    return methods


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


def settings_with(**changes) -> Settings:
    """Return the default settings with some fields changed."""
    return replace(Settings(), **changes)
