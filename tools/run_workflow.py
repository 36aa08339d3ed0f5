#!/usr/bin/env python3
"""Run a shipped VCT workflow headless, in-process, with your own ComfyUI install:

    python ComfyUI/custom_nodes/ComfyUI-VCT/tools/run_workflow.py --comfyui ComfyUI \\
        --workflow subject_translation --checkpoint v1-5-pruned-emaonly.safetensors \\
        --source photo.jpg --reference dog.jpg [--set VCTConceptLearn.steps=200] [--cpu]

or its demo, which needs no download: the subject-translation workflow on the toy world's trained
model and two of its images, shipped in tools/demo/, on the CPU (about a minute):

    python ComfyUI/custom_nodes/ComfyUI-VCT/tools/run_workflow.py --comfyui ComfyUI --demo

Exit codes: 0 done (saved image paths on stdout; the demo's result card last), 1 a node failed, 2 bad
arguments or an invalid prompt, 130 interrupted. Beside it, vct_ui_to_api.py converts the UI workflow
to an API prompt, vct_execute.py runs that prompt with ComfyUI's executor, and vct_demo.py and
vct_toy.py hold the demo's model and card. Nothing from ComfyUI is imported at import time, only
inside functions once `bootstrap()` has run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(os.path.abspath(__file__)).parent  # not resolved: the pack may be a symlink in custom_nodes
PACK_ROOT = TOOLS_DIR.parent
WORKFLOWS_DIR = PACK_ROOT / "example_workflows"  # the folder ComfyUI lists as the pack's templates
log = logging.getLogger("vct.run_workflow")


def bootstrap(comfyui_path, cpu: bool = False) -> bool:
    """Import ComfyUI from `comfyui_path` and register its nodes; return False if this process already had it."""
    root = Path(comfyui_path).expanduser().resolve()
    loaded = sys.modules.get("nodes")
    if loaded is not None and hasattr(loaded, "NODE_CLASS_MAPPINGS") and "execution" in sys.modules:
        if Path(loaded.__file__).resolve().parent != root:
            raise UsageError(f"this process already runs the ComfyUI at {Path(loaded.__file__).parent}, not {root}")
        return False
    missing = [p for p in ("nodes.py", "execution.py", "folder_paths.py", "comfy/cli_args.py")
               if not (root / p).is_file()]
    if missing:
        raise UsageError(f"--comfyui {comfyui_path}: not a ComfyUI folder (missing {', '.join(missing)})")
    sys.path.insert(0, str(root))
    importlib.import_module("comfy.cli_args").args.cpu = bool(cpu)  # read when comfy.model_management is imported
    # in this order: the `utils` package before nodes.py puts comfy/ (with its utils.py) first on sys.path
    try:
        for name in ("comfy.model_management", "utils.install_util", "utils.extra_config", "execution", "server",
                     "nodes"):
            importlib.import_module(name)
    except Exception as e:  # e.g. torch finds no GPU driver
        raise UsageError(f"ComfyUI at {root} failed to start: {type(e).__name__}: {e}"
                         + ("" if cpu else " (no usable GPU? try --cpu)")) from e
    nodes, server = sys.modules["nodes"], sys.modules["server"]
    if Path(nodes.__file__).resolve() != root / "nodes.py":
        raise UsageError(f"`import nodes` gave {nodes.__file__}, not {root / 'nodes.py'}")
    policy = governance()
    if policy is not None:  # as main.py, before paths and packs: a governed build applies its signed policy
        policy.initialize()
    load_path_configs(root)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:  # created, not started, as main.py does: custom nodes add routes to PromptServer.instance
        prompt_server(server, loop)
    except Exception as e:  # noqa: BLE001 - a pack needing it then fails to load, and ComfyUI says so
        log.warning("could not create ComfyUI's PromptServer (%s); packs that need it may not load", e)
    loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if policy is not None:  # as main.py after loading nodes: the policy's disabled nodes are removed
        policy.apply_disabled_nodes(set())
    return True


def governance():
    """Return 0.38.x's `app.governance` (a governed build's signed policy, which main.py applies), else None."""
    try:
        module = importlib.import_module("app.governance")
    except ImportError:  # 0.3.64 has none
        return None
    return module if callable(getattr(module, "initialize", None)) else None


def load_path_configs(root) -> list[Path]:
    """Read the model-path files in the ComfyUI folder `root` as 0.38.x's main.py does; return the ones read.

    `extra_paths.yaml` first; when it exists, `extra_model_paths.yaml` is ignored with a warning (main.py's
    `apply_custom_paths`); otherwise `extra_model_paths.yaml`. Then, as main.py on every version, the output
    folder's checkpoints, clip, vae, diffusion_models and loras subfolders are added to those model folders.
    """
    import folder_paths

    load = importlib.import_module("utils.extra_config").load_extra_path_config
    newer, older = Path(root) / "extra_paths.yaml", Path(root) / "extra_model_paths.yaml"
    read = []
    if newer.is_file():
        # 0.38.x lets extra_paths.yaml name system folders; older versions' loader takes no such option
        if "allow_system_dirs" in inspect.signature(load).parameters:
            load(str(newer), allow_system_dirs=True)
        else:
            load(str(newer))
        read.append(newer)
        if older.is_file():
            log.warning("both %s and %s exist; ignoring the deprecated %s, as ComfyUI does", newer.name, older.name,
                        older.name)
    elif older.is_file():
        load(str(older))
        read.append(older)
    for name in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.get_output_directory(), name))
    return read


def prompt_server(server, loop):
    """Create ComfyUI's PromptServer for `loop` (not started) with the arguments this version's constructor takes.

    0.3.64 takes `PromptServer(loop)`; 0.38.x `PromptServer(loop, asset_manager)`, which the runner gives the
    assets-off manager (no database, no file scans) that 0.38.x's PromptExecutor also uses by default.
    """
    if "asset_manager" not in inspect.signature(server.PromptServer).parameters:
        return server.PromptServer(loop)
    return server.PromptServer(loop, headless_asset_manager())


def headless_asset_manager():
    """Return 0.38.x's asset manager with assets off (`app.assets.manager.NoAssets`), else its default one."""
    from comfy.cli_args import args

    manager = importlib.import_module("app.assets.manager")
    no_assets = getattr(manager, "NoAssets", None)
    return no_assets(args) if no_assets is not None else manager.default_asset_manager()


def ensure_pack_loaded() -> bool:
    """Load this pack from its own folder unless ComfyUI already has its nodes; return True if it had to."""
    import nodes

    if "VCTDDIMInvert" in nodes.NODE_CLASS_MAPPINGS:
        return False
    ignore = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT), ignore=ignore, module_parent="custom_nodes")):
        raise UsageError(f"ComfyUI could not load the VCT nodes from {PACK_ROOT} (see the log above)")
    return True


# ---------------------------------------------------------------------------- UI workflow -> API prompt

def _load_file(name: str, path: Path):
    """Return the module in file `path`, imported once as `name` (the pack's folders are not packages here)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


conversion = _load_file("vct_ui_to_api", TOOLS_DIR / "vct_ui_to_api.py")
node_info, _matching, api_prompt_from_file = conversion.node_info, conversion._matching, conversion.api_prompt_from_file
running = _load_file("vct_execute", TOOLS_DIR / "vct_execute.py")
UsageError, ExecutionError, validate = running.UsageError, running.ExecutionError, running.validate
showing = _load_file("vct_demo", TOOLS_DIR / "vct_demo.py")


# ---------------------------------------------------------------------------- preparing the prompt

def _workflow_key(name: str) -> str:
    """Return a shipped workflow's short name: 'VCT subject translation.json' -> 'subject_translation',
    'VCT + ControlNet.json' -> 'controlnet'."""
    stem = name[: -len(".json")] if name.lower().endswith(".json") else name
    words = re.findall(r"[a-z0-9]+", stem.lower())
    return "_".join(words[1:] if words[:1] == ["vct"] else words)


# Short names where the file name's words would give a clumsy one ('sd3_5_subject_translation').
SHORT_NAMES = {"VCT SD3.5 subject translation.json": "sd35_translation",
               "VCT Flux.1 subject translation.json": "flux_translation"}


def shipped_workflows() -> dict:
    """Return {short name: file} of the workflows shipped in example_workflows/."""
    return {SHORT_NAMES.get(p.name, _workflow_key(p.name)): p for p in sorted(WORKFLOWS_DIR.glob("*.json"))}


def resolve_workflow(name) -> Path:
    """Return the file of a workflow given as a path, a shipped name (`subject_translation`, `sd35_translation`,
    `flux_translation`, ...) or a shipped file's name."""
    if Path(name).is_file():
        return Path(name).resolve()
    shipped = shipped_workflows()
    known = {**{_workflow_key(p.name): p for p in shipped.values()}, **shipped}  # short names win
    if _workflow_key(str(name)) in known:
        return known[_workflow_key(str(name))].resolve()
    raise UsageError(f"--workflow {name}: no such file or shipped workflow (shipped: {', '.join(sorted(shipped))})")


def _upstream(prompt: dict, node_id: str, input_name: str) -> list[str]:
    """Return the ids of all nodes upstream of one input of a node, nearest first."""
    link = prompt[node_id]["inputs"].get(input_name)
    todo, seen = ([str(link[0])] if isinstance(link, list) else []), []
    while todo:
        nid = todo.pop(0)
        if nid not in seen and nid in prompt:
            seen.append(nid)
            todo += [str(v[0]) for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return seen


def find_image_loaders(prompt: dict) -> tuple[str, str]:
    """Return the (source, reference) LoadImage ids: those upstream of VCTDDIMInvert's / VCTConceptLearn's latent."""
    found = []
    for ctype, role in (("VCTDDIMInvert", "source"), ("VCTConceptLearn", "reference")):
        loaders = {n for k, v in prompt.items() if v["class_type"] == ctype
                   for n in _upstream(prompt, k, "latent") if prompt[n]["class_type"] == "LoadImage"}
        if len(loaders) != 1:
            raise UsageError(f"cannot find the {role} image: the workflow needs exactly one LoadImage feeding "
                             f"{ctype}'s latent (found {sorted(loaders) or 'none'})")
        found.append(loaders.pop())
    if found[0] == found[1]:
        raise UsageError(f"LoadImage {found[0]} feeds both the inversion and the concept: expected two images")
    return found[0], found[1]


def parse_value(text: str):
    """Return `text` as a bool (true/false), an int, a float, or else a string (surrounding quotes removed)."""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    for conv in (int, float):
        with contextlib.suppress(ValueError):
            return conv(text)
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def parse_override(text: str) -> tuple[str, str, object]:
    """Return (node class or id, input name, value) of a `--set CLASS_OR_ID.input=value` argument."""
    key, eq, value = text.partition("=")
    node, dot, name = key.strip().rpartition(".")
    if not (eq and dot and node and name):
        raise UsageError(f"--set {text!r}: expected CLASS_OR_ID.input=value, e.g. VCTConceptLearn.steps=200")
    return node, name, parse_value(value)


def apply_overrides(prompt: dict, overrides) -> None:
    """Apply `--set` strings (or (node, input, value) tuples) to the prompt; raise UsageError on unknown names."""
    for item in overrides:
        node, name, value = parse_override(item) if isinstance(item, str) else item
        if not _matching(prompt, node):
            classes = ", ".join(sorted({v["class_type"] for v in prompt.values()}))
            raise UsageError(f"--set {node}.{name}: no node with id or class {node!r} in the workflow ({classes})")
        for k in _matching(prompt, node):
            info = node_info(prompt[k]["class_type"])["input"]
            known = sorted(n for s in ("required", "optional") for n in (info.get(s) or {}))
            if name not in known:
                raise UsageError(f"--set {node}.{name}: {prompt[k]['class_type']} has no input {name!r} "
                                 f"(inputs: {', '.join(known)})")
            if isinstance(prompt[k]["inputs"].get(name), list):
                raise UsageError(f"--set {node}.{name}: that input of node {k} is connected to another node")
            prompt[k]["inputs"][name] = value


def stage_image(path) -> str:
    """Copy an image into ComfyUI's input/vct/ folder (named by its content); return the LoadImage value."""
    import folder_paths
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - any decoder error means "not an image we can load"
        raise UsageError(f"{path}: not a readable image ({e})") from e
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    target = Path(folder_paths.get_input_directory()) / "vct" / f"{path.stem}-{digest}{path.suffix.lower()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        shutil.copyfile(path, target)
    return f"vct/{target.name}"


def build_prompt(workflow, checkpoint, source, reference, overrides=()) -> dict:
    """Return the workflow's API prompt with the checkpoint, the images (copied to input/vct/) and overrides set."""
    try:
        prompt = api_prompt_from_file(resolve_workflow(workflow))
    except KeyError as e:
        raise UsageError(f"{e.args[0]}: is the custom node pack that provides it installed?") from e
    src_id, ref_id = find_image_loaders(prompt)
    prompt[src_id]["inputs"]["image"], prompt[ref_id]["inputs"]["image"] = stage_image(source), stage_image(reference)
    if checkpoint:
        loaders = [v for v in prompt.values() if isinstance(v["inputs"].get("ckpt_name"), str)]
        if not loaders:
            raise UsageError("--checkpoint given, but the workflow has no checkpoint loader")
        for v in loaders:
            v["inputs"]["ckpt_name"] = checkpoint
    apply_overrides(prompt, overrides)
    return prompt


# ---------------------------------------------------------------------------- validating and executing

def execute(prompt: dict, outputs: list[str]) -> list[Path]:
    """Run a validated prompt with ComfyUI's PromptExecutor; return the absolute paths of the saved images."""
    return running.execute(prompt, outputs)


def demo(comfyui_path, overrides=()) -> list[Path]:
    """Run the demo on the CPU: the subject-translation workflow on the toy model and images of tools/demo/.

    Returns the saved translation's path(s), then the path of the result card (source + reference ->
    translation) written beside them in ComfyUI's output folder. `overrides` apply after the demo's own.
    """
    start = time.perf_counter()
    bootstrap(comfyui_path, cpu=True)  # the toy model is small: the CPU, whatever the machine has
    ensure_pack_loaded()
    import folder_paths
    import torch

    toy_model = _load_file("vct_toy", TOOLS_DIR / "vct_toy.py")  # imports ComfyUI: only after bootstrap
    threads = torch.get_num_threads()
    # One thread: the toy model's layers are too small to gain from more, and on a busy machine threads
    # that wait for each other made the demo ten times slower (52 s against 3.8 s for 50 concept steps).
    torch.set_num_threads(1)
    try:
        with showing.toy_checkpoint(toy_model.load_trained) as checkpoint:
            prompt = build_prompt(showing.WORKFLOW, checkpoint, showing.SOURCE, showing.REFERENCE,
                                  [*showing.OVERRIDES, *overrides])
            saved = execute(prompt, validate(prompt))
    finally:
        torch.set_num_threads(threads)
    if not saved:
        raise ExecutionError("the demo saved no image")
    card = showing.save_card(saved[0], folder_paths.get_output_directory())
    log.info("demo done in %.0f s; the result card (source + reference -> VCT translation): %s",
             time.perf_counter() - start, card)
    return [*saved, card]


def run(comfyui_path, workflow, checkpoint, source, reference, overrides=(), cpu=False) -> list[Path]:
    """Bootstrap ComfyUI (unless this process has it) and run the workflow; return the saved images' paths."""
    for role, path in (("source", source), ("reference", reference)):
        if not Path(path).is_file():
            raise UsageError(f"--{role} {path}: no such file")
    bootstrap(comfyui_path, cpu=cpu)
    ensure_pack_loaded()
    prompt = build_prompt(workflow, checkpoint, source, reference, overrides)
    return execute(prompt, validate(prompt))


def main(argv=None) -> int:
    """Run the command line; return the exit code (0 done, 1 a node failed, 2 bad input, 130 interrupted)."""
    ap = argparse.ArgumentParser(description="Run a VCT workflow headless with your ComfyUI.")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or str(PACK_ROOT.parents[1]),
                    help="the ComfyUI folder (default: $COMFYUI_PATH, else the one this pack is installed in)")
    ap.add_argument("--demo", action="store_true",
                    help="run the subject-translation workflow on the toy model and images shipped in tools/demo/, "
                         "on the CPU (about a minute; no download); prints the saved image and the result card")
    ap.add_argument("--workflow", help="subject_translation, style_transfer, controlnet, fast_translation, "
                    "sd35_translation (SD3.5), flux_translation (Flux.1 dev), or a workflow file")
    ap.add_argument("--checkpoint", help="a file in ComfyUI's models/checkpoints (default: the workflow's)")
    ap.add_argument("--source", help="the image whose structure is kept")
    ap.add_argument("--reference", help="the image of the object or style to bring in")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="CLASS_OR_ID.INPUT=VALUE",
                    help="override a node input, e.g. VCTConceptLearn.steps=200 (repeatable)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (ComfyUI's --cpu)")
    ap.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    args = ap.parse_args(argv)
    given = [f"--{name}" for name in ("workflow", "checkpoint", "source", "reference") if getattr(args, name)]
    if args.demo and given:
        ap.error(f"--demo brings its own workflow, model and images: drop {', '.join(given)}")
    missing = [f"--{name}" for name in ("workflow", "source", "reference") if not getattr(args, name)]
    if not args.demo and missing:
        ap.error(f"the following arguments are required: {', '.join(missing)} (or --demo)")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)  # also when logging was configured before
    try:
        if args.demo:
            saved = demo(args.comfyui, args.overrides)
        else:
            saved = run(args.comfyui, args.workflow, args.checkpoint, args.source, args.reference, args.overrides,
                        args.cpu)
    except (UsageError, ExecutionError) as e:
        log.error("error: %s", e)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    for path in saved:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
