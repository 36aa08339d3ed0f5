"""Does VCT translate? The toy world's task set through the real nodes, measured like the paper.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_quality.py
    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_quality.py --tasks 4 --cost-tasks 0   # quick look

Trains the toy model first if its weights are neither committed nor cached (about 15 minutes on
2 CPU cores; see tests/quality/toy_model.py). For every task (a source and a reference image of
tests/quality/world.py) it runs one ComfyUI prompt holding VCT with the paper's defaults, its
ablations and the baselines, then prints one table: per method the structure IoU with the
source's mask, the concept accuracy (the reference's colour and texture recognised in the
output), their product, how often the source's shape was kept, B*'s PSNR against the source,
UNet rows run forward and forward+backward, and wall time, each the mean over the tasks.
`--cost-tasks N` adds the cost variants (fewer concept steps, 10 null-text inner steps, bfloat16
training) on the first N tasks, and `--reconstruction-tasks N` the null-text reconstruction test
with the source's caption as source prompt. `--grid` writes a PNG of a few tasks (source,
reference, VCT, SDEdit 0.75, plain CFG) and `--json` every per-task figure. `--family sd3` runs the
same table on the joint-attention transformer toy model (tests/quality/toy_flow_model.py), with its
`joint_blocks` choices as extra rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for folder in ("tests/quality", "tests/host"):
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))

from support import comfy_env  # noqa: E402

COLUMNS = ("structure", "concept", "both", "score", "shape_kept", "placement", "background", "texture_taken", "psnr",
           "forward", "train", "seconds", "time_ratio")
HEADER = ("method", "IoU", "concept", "both", "IoUxconc", "shape", "box IoU", "bg PSNR", "texture", "B* PSNR",
          "fwd rows", "fwd+bwd", "time s", "x VCT")
GRID_METHODS = ("vct", "fast preset", "SDEdit 0.75", "plain CFG from z*_T")
# Appearance attention alone (strength 1, every step) under kernel settings the node does not expose.
STUDY = {
    "decoder >= 1/4 of positions (default)": {},
    "decoder, every level": {"min_area_fraction": 0.0},
    "every block >= 1/4 of positions": {"decoder_only": False},
    "queries: B's own (gamma 0)": {"query_preservation": 0.0},
    "queries: B*'s (gamma 1)": {"query_preservation": 1.0},
    "temperature 1": {"temperature": 1.0},
}
# The toy model's 16x16 decoder layers match the source object to the reference's no better than
# chance, its 8x8 ones 1.7x (tests/benchmarks/probe_correspondence.py): a round without the 16x16 level.
STUDY_3 = {
    "decoder, 8x8 level only (1/4 of positions)": {"max_area_fraction": 0.25},
    "decoder, 8x8 and 4x4 levels": {"min_area_fraction": 0.0, "max_area_fraction": 0.25},
    "decoder, 8x8 only, temperature 1": {"max_area_fraction": 0.25, "temperature": 1.0},
    "decoder, 8x8 only, gamma 0.5": {"max_area_fraction": 0.25, "query_preservation": 0.5},
}
# The third round's best, on more tasks.
STUDY_4 = {"decoder, 8x8 level only (1/4 of positions)": {"max_area_fraction": 0.25}}
# A second round around the first's best (temperature 1).
STUDY_2 = {
    "temperature 1, gamma 0.5": {"temperature": 1.0, "query_preservation": 0.5},
    "temperature 1, every block and level": {"temperature": 1.0, "decoder_only": False, "min_area_fraction": 0.0},
    "temperature 1, decoder, every level": {"temperature": 1.0, "min_area_fraction": 0.0},
    "temperature 2": {"temperature": 2.0},
}


def parse_args() -> argparse.Namespace:
    """Return the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=24, help="how many tasks of the task set to run (default 24)")
    p.add_argument("--cost-tasks", type=int, default=8, help="run the cost variants on the first N tasks")
    p.add_argument("--reconstruction-tasks", type=int, default=8,
                   help="run the caption-prompt reconstruction test on the first N tasks")
    p.add_argument("--sequential-tasks", type=int, default=8,
                   help="rerun VCT with sequential (not fused) accumulation in concept learning on the first N tasks")
    p.add_argument("--seed", type=int, default=0, help="seed of concept learning and of the KSampler baselines")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the first --grid-tasks tasks")
    p.add_argument("--grid-tasks", type=int, default=6)
    p.add_argument("--json", type=Path, default=None, help="write every per-task figure as JSON")
    p.add_argument("--appearance-tasks", type=int, default=0,
                   help="run reference appearance attention (alone, with the concept, fast presets) on the first "
                   "N tasks")
    p.add_argument("--cast-tasks", type=int, default=0,
                   help="on the first N tasks, the rows that look for the background cast's origin")
    p.add_argument("--blend-tasks", type=int, default=0, help="on the first N tasks, VCT with local blend")
    p.add_argument("--fast-tasks", type=int, default=0, help="on the first N tasks, the fast configurations")
    p.add_argument("--fast-only", nargs="*", default=None,
                   help="run only the fast configurations whose label contains one of these words")
    p.add_argument("--study-tasks", type=int, default=0,
                   help="on the first N tasks, rerun appearance attention alone under each layer/query setting")
    p.add_argument("--study-round", type=int, default=1, choices=(1, 2, 3, 4), help="which study settings to run")
    p.add_argument("--no-main", action="store_true",
                   help="skip the main methods (ablations, baselines); VCT's defaults still run beside appearance")
    p.add_argument("--equalizer", default="concept_tokens", choices=("concept_tokens", "reference_code"),
                   help="the equaliser VCT runs with (the other one is measured as an ablation)")
    p.add_argument("--family", default="sd15", choices=("sd15", "sd3"),
                   help="the toy model: sd15 (the UNet, tests/quality/toy_model.py) or sd3 (the joint-attention "
                   "transformer, tests/quality/toy_flow_model.py)")
    p.add_argument("--blocks-tasks", type=int, default=None,
                   help="with --family sd3, the joint_blocks choices on the first N tasks (default: every task)")
    p.add_argument("--cfg", type=float, default=None, help="CFG of every CFG method (default: the paper's 7.5)")
    return p.parse_args()


def mean_rows(per_task: list[dict]) -> dict[str, dict]:
    """Return per method the mean of every column over the tasks that ran it."""
    methods: dict[str, list[dict]] = {}
    for rows in per_task:
        for name, row in rows.items():
            methods.setdefault(name, []).append(row)
    table = {}
    for name, rows in methods.items():
        table[name] = {"tasks": len(rows)}
        for column in COLUMNS:
            values = [r[column] for r in rows if column in r and np.isfinite(r[column])]
            if values:
                table[name][column] = float(np.mean(values))
        patterned = [r["texture_taken"] for r in rows if "texture_taken" in r]
        # Texture taken when the reference is patterned: n of the tasks (each task's share of its images).
        table[name]["texture_taken"] = (float(np.sum(patterned)), len(patterned)) if patterned else None
    return table


def add_time_ratios(per_task: list[dict]) -> None:
    """Give every row its time as a ratio to VCT's defaults on the same task (same run)."""
    for rows in per_task:
        vct = rows.get("vct", {}).get("seconds")
        for row in rows.values():
            if vct and "seconds" in row:
                row["time_ratio"] = row["seconds"] / vct


def format_table(table: dict[str, dict]) -> str:
    """Return the table as aligned text."""
    lines = ["  ".join(f"{h:>10}" if i else f"{h:<36}" for i, h in enumerate(HEADER)) + "  tasks"]
    for name, row in table.items():
        cells = [f"{name:<36}"]
        for column in COLUMNS:
            value = row.get(column)
            if value is None:
                cells.append(f"{'-':>10}")
            elif column == "texture_taken":
                cells.append(f"{f'{value[0]:.0f} of {value[1]}':>10}")
            elif column in ("forward", "train"):
                cells.append(f"{value:>10.0f}")
            elif column in ("psnr", "seconds", "background"):
                cells.append(f"{value:>10.1f}")
            else:
                cells.append(f"{value:>10.3f}")
        lines.append("  ".join(cells) + f"  {row['tasks']:>5}")
    return "\n".join(lines)


# VCT's stages with the paper's defaults: (label, node id in harness.build's graph).
STAGES = (("VCT DDIM Invert", "ddim"), ("VCT Content Null-Text Invert", "null_null_text"),
          ("VCT Concept Embedding Learn", "concept"), ("VCT Dual-Branch Sampler", "vct"))


def format_stages(outcomes: list) -> str:
    """Return the mean wall time and model rows (forward, forward+backward) of VCT's stages per task, as text."""
    lines = [f"{'stage (mean per task)':<36}  {'time s':>10}  {'fwd rows':>10}  {'fwd+bwd':>10}"]
    for label, node in STAGES:
        costs = [o.costs[node] for o in outcomes if node in o.costs]
        if costs:
            seconds, forward, train = (np.mean([c[k] for c in costs]) for k in ("seconds", "forward", "train"))
            lines.append(f"{label:<36}  {seconds:>10.1f}  {forward:>10.0f}  {train:>10.0f}")
    return "\n".join(lines)


def write_grid(path: Path, outcomes: list, scale: int = 4) -> None:
    """Write a PNG: one row per task, columns source, reference and the GRID_METHODS results."""
    import world
    from PIL import Image

    rows = []
    for outcome in outcomes:
        cells = [world.render(outcome.task.source), world.render(outcome.task.reference)]
        labels = {"fast preset": __import__("harness").FAST_PRESET.label}
        cells += [outcome.images[(labels.get(m, m), "result")][0] for m in GRID_METHODS
                  if (labels.get(m, m), "result") in outcome.images]
        gap = np.ones((world.SIDE, 1, 3))
        rows.append(np.concatenate([c for cell in cells for c in (cell, gap)][:-1], axis=1))
    gap = np.ones((1, rows[0].shape[1], 3))
    grid = np.concatenate([r for row in rows for r in (row, gap)][:-1], axis=0)
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)).save(path, optimize=True)


def main() -> int:
    """Run the task set and print the table; return the exit code."""
    args = parse_args()
    comfy_env.ensure_bootstrapped()
    import harness
    import running
    import safetensors
    import scoring
    import toy_model
    import world
    from support import comfy_runner

    if args.family == "sd3":
        import toy_flow_model

        weights = toy_flow_model.weights_path()
        # The UNet-only rows: bfloat16 training and sequential accumulation are measured on the UNet.
        args.cost_tasks, args.sequential_tasks = 0, 0
        blocks_tasks = args.tasks if args.blocks_tasks is None else args.blocks_tasks
    else:
        weights = toy_model.weights_path()
        blocks_tasks = 0
    with safetensors.safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    print(f"toy model: {weights.name}, trained in {meta.get('training_seconds', '?')} s "
          f"(torch {meta.get('torch', '?')}), {os.cpu_count()} CPU cores here")
    accuracy = world.analyser_accuracy(count=500)
    degraded = world.analyser_accuracy(count=500, degraded=True)
    print("analysers on 500 held-out scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
          + "; with blur and noise: " + ", ".join(f"{k} {v:.3f}" for k, v in degraded.items()))

    env = comfy_env.get_env()
    pack = comfy_runner.load_pack()
    counter = running.PassCounter()
    fields = dict(equalizer=args.equalizer, seed=args.seed, family=args.family)
    settings = harness.settings_with(**fields, **({} if args.cfg is None else {"cfg": args.cfg}))
    if args.fast_only is not None:  # this run's fast configurations (the harness reads FAST when it builds)
        harness.FAST = tuple(f for f in harness.FAST if any(word in f.label for word in args.fast_only))
    tasks = harness.task_set()[: args.tasks]
    per_task, outcomes, record = [], [], []
    start = time.perf_counter()
    clip = toy_model.build()[1] if args.family == "sd15" else None  # only to count the caption's tokens
    with running.toy_checkpoint(env, counter, weights):
        runner = running.Runner(env.input_dir, counter)
        for task in tasks:
            groups = [] if args.no_main else ["main"]
            if task.index < args.appearance_tasks:
                groups.append("appearance")
            if task.index < args.cast_tasks:
                groups.append("cast")
            if task.index < args.blend_tasks:
                groups.append("blend")
            if task.index < args.fast_tasks:
                groups.append("fast")
            if task.index < args.cost_tasks:
                groups.append("cost")
            if task.index < args.reconstruction_tasks:
                groups.append("reconstruction")
            if task.index < blocks_tasks:
                groups.append("blocks")
            if not groups:  # only the study runs on this task
                per_task.append({})
                continue
            text_tokens = harness.caption_tokens(clip, task.reference.caption()) if clip is not None else 0
            outcome = runner.run(task, settings, tuple(groups), text_tokens=text_tokens)
            rows = scoring.score(outcome)
            per_task.append(rows)
            outcomes.append(outcome)
            record.append({"task": task.name, "seconds": outcome.seconds, "methods": rows})
            vct = rows["vct"]
            print(f"[{time.perf_counter() - start:7.0f} s] {task.name}: VCT IoU {vct['structure']:.2f} concept "
                  f"{vct['concept']:.2f} found {vct['found']}; task {outcome.seconds:.0f} s", flush=True)
        # Sequential accumulation in a fresh executor, whose empty cache makes every node run again.
        runner = running.Runner(env.input_dir, counter)
        for task, rows in zip(tasks[: args.sequential_tasks], per_task):
            if args.no_main:
                break
            with running.sequential_accumulation(pack.module.nodes.model.training):
                outcome = runner.run(task, settings, ("sequential",))
            rows.update(scoring.score(outcome))
            print(f"[{time.perf_counter() - start:7.0f} s] {task.name}: sequential accumulation, task "
                  f"{outcome.seconds:.0f} s", flush=True)
        study = {1: STUDY, 2: STUDY_2, 3: STUDY_3, 4: STUDY_4}[args.study_round]
        for label, fields in study.items() if args.study_tasks else ():
            runner = running.Runner(env.input_dir, counter)  # a fresh cache: the sampler must run again
            with running.appearance_settings(pack.module.vct_ops, **fields):
                for task, rows in zip(tasks[: args.study_tasks], per_task):
                    study = scoring.score(runner.run(task, settings, ("study",)))["study"]
                    rows[f"study: {label}"] = study
            print(f"[{time.perf_counter() - start:7.0f} s] study {label} done", flush=True)
    add_time_ratios(per_task)
    table = mean_rows(per_task)
    if "vct" not in table:  # a study alone: nothing to compare subsets with
        print(format_table(table))
        if args.json is not None:
            args.json.write_text(json.dumps({"table": table, "tasks": record}, indent=1))
        return 0
    samples = table.pop("concept samples", None)
    print()
    print(f"{len(tasks)} tasks, {time.perf_counter() - start:.0f} s; means per task "
          f"(VCT runs equalizer={args.equalizer}):")
    print(format_table(table))
    shown = set()
    for name, row in table.items():
        subset_ids = tuple(i for i, rows in enumerate(per_task) if name in rows)
        if row["tasks"] < len(tasks) and subset_ids not in shown:
            # Variants run on a subset: VCT's figures on exactly those tasks, for a fair comparison.
            shown.add(subset_ids)
            subset = [per_task[i]["vct"] for i in subset_ids]
            same = {c: float(np.mean([r[c] for r in subset])) for c in ("score", "structure", "concept", "seconds")}
            psnr = [r["psnr"] for r in subset]
            print(f"  on the {row['tasks']} tasks of {name} (and every variant run on them) VCT scores "
                  f"IoUxconc {same['score']:.3f}, IoU {same['structure']:.3f}, concept {same['concept']:.3f}, "
                  f"B* PSNR {np.mean(psnr):.1f}, {same['seconds']:.1f} s")
    print(format_stages(outcomes))
    if samples is not None:
        print(f"concept learning alone: of {settings.concept_samples} plain CFG samples of the learned concept per "
              f"task, {samples['both']:.3f} carry the reference's colour and texture (attribute accuracy "
              f"{samples['concept']:.3f})")
    if args.grid is not None:
        write_grid(args.grid, outcomes[: args.grid_tasks])
        print(f"grid: {args.grid}")
    if args.json is not None:
        args.json.write_text(json.dumps({"table": table, "tasks": record}, indent=1))
        print(f"per-task figures: {args.json}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
