#!/usr/bin/env python3
"""Write the template thumbnails of the shipped workflows, the pack's icon, and the demo's two input images.

    python tests/quality/thumbnails.py [--grid docs/toy_world_grid.png]

The grid is what `tests/benchmarks/bench_quality.py --grid` writes from a real run of the pack's
nodes on the trained toy model: one task per row (the task set's first tasks, in order), columns
source, reference, VCT, the fast preset, then two baselines, 64 px cells 4 px apart. Each thumbnail is a 512 px
square card, as the frontend's template cards are square: one task's source and reference, labelled
and joined by "+", an arrow, and the VCT output below (the card the runner's demo draws too,
tools/vct_demo.py). The ControlNet template's also shows the source's edge map, which its
ControlNet follows (the toy model has no ControlNet, so its result is the same run's). ComfyUI
serves a thumbnail as `<workflow name>.jpg` beside the workflow. The icon (`docs/icon.png`, the
Icon of pyproject.toml's registry section) shows the subject task as "source + reference ->
VCT" on a square. The demo's inputs (tools/demo/source.png, reference.png) are the subject task's
scenes rendered by world.py at 128 px.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import harness
import numpy as np
import world
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
CELL, GAP = 64, 4
# Workflow -> grid row: a task whose reference brings its colour and shape (subject), and one whose
# reference brings its texture and colour (style).
ROWS = {"VCT subject translation": 0, "VCT style transfer": 5, "VCT + ControlNet": 0, "VCT fast translation": 0}
# Workflow -> (grid column, label) of its result where it is not VCT's defaults (column 2).
RESULTS = {"VCT fast translation": (3, "VCT fast")}
# The ControlNet template's strip also shows the source's edges, as its Canny node draws them.
WITH_EDGES = {"VCT + ControlNet"}


def cell(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    """Return one 64 px cell of the grid."""
    top, left = row * (CELL + GAP), column * (CELL + GAP)
    return grid[top : top + CELL, left : left + CELL]


def edges(tile: np.ndarray) -> np.ndarray:
    """Return a white-on-black edge map of a cell: where its colour changes between neighbouring pixels."""
    grey = tile.astype(np.float32).mean(axis=2)
    step = np.zeros_like(grey)
    step[:, 1:] = np.maximum(step[:, 1:], np.abs(np.diff(grey, axis=1)))
    step[1:, :] = np.maximum(step[1:, :], np.abs(np.diff(grey, axis=0)))
    mask = (step > 24).astype(np.uint8) * 255
    return np.repeat(mask[:, :, None], 3, axis=2)


def demo_module():
    """Return the pack's tools/vct_demo.py (the card drawing and the demo's file names), imported once."""
    if "vct_demo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("vct_demo", ROOT / "tools" / "vct_demo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["vct_demo"] = module
        spec.loader.exec_module(module)
    return sys.modules["vct_demo"]


def thumbnail(grid: np.ndarray, row: int, with_edges: bool = False, result: tuple = (2, "VCT")) -> Image.Image:
    """Return a grid row's 512 px square card: source + reference (after the source's edges, if asked) -> the result
    in grid column `result[0]`, labelled `result[1]`."""
    source, reference = cell(grid, row, 0), cell(grid, row, 1)
    inputs = [("source", source), ("reference", reference)]
    if with_edges:
        inputs.insert(1, ("edges", edges(source)))
    return demo_module().card(inputs, (result[1], cell(grid, row, result[0])))


def demo_inputs(task: int) -> dict:
    """Return {file: uint8 picture} of a task's source and reference, rendered at 128 px as the toy model sees them."""
    chosen = harness.task_set()[task]
    scale = 8  # the toy model's latent factor: one world pixel per latent position
    return {name: np.round(np.repeat(np.repeat(np.asarray(world.render(scene), dtype=np.float32), scale, 0), scale, 1)
                           * 255).astype(np.uint8)
            for name, scene in (("source.png", chosen.source), ("reference.png", chosen.reference))}


def icon(grid: np.ndarray, row: int = 0, side: int = 400) -> Image.Image:
    """Return the square pack icon: a row's source and reference above, its VCT output below."""
    small, large, margin = 128, 192, 24  # whole multiples of the 64 px cell, so pixels stay square
    image = Image.new("RGB", (side, side), (32, 32, 32))
    draw = ImageDraw.Draw(image)
    source, reference, result = (Image.fromarray(cell(grid, row, column)) for column in range(3))
    right = side - margin - small
    image.paste(source.resize((small, small), Image.NEAREST), (margin, margin))
    image.paste(reference.resize((small, small), Image.NEAREST), (right, margin))
    image.paste(result.resize((large, large), Image.NEAREST), ((side - large) // 2, side - margin - large))
    ink, centre, width = (235, 235, 235), side // 2, 8
    # "+" between the two inputs, and an arrow down to the output.
    middle = margin + small // 2
    draw.line((centre - 22, middle, centre + 22, middle), fill=ink, width=width)
    draw.line((centre, middle - 22, centre, middle + 22), fill=ink, width=width)
    top, bottom = margin + small + 4, side - margin - large - 4
    draw.line((centre, top, centre, bottom - 10), fill=ink, width=width)
    draw.polygon([(centre - 14, bottom - 14), (centre + 14, bottom - 14), (centre, bottom)], fill=ink)
    return image


def main(argv=None) -> int:
    """Write one JPEG per shipped workflow into example_workflows/, the icon into docs/, the demo's inputs."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=Path, default=ROOT / "docs" / "toy_world_grid.png")
    args = ap.parse_args(argv)
    grid = np.asarray(Image.open(args.grid).convert("RGB"))
    for name, row in ROWS.items():
        path = ROOT / "example_workflows" / f"{name}.jpg"
        thumbnail(grid, row, with_edges=name in WITH_EDGES, result=RESULTS.get(name, (2, "VCT"))).save(path, quality=90)
        print(path)
    path = ROOT / "docs" / "icon.png"
    icon(grid, ROWS["VCT subject translation"]).save(path, optimize=True)
    print(path)
    demo = demo_module()
    for name, picture in demo_inputs(ROWS["VCT subject translation"]).items():
        path = demo.DEMO_DIR / name
        Image.fromarray(picture).save(path, optimize=True)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
