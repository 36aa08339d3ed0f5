#!/usr/bin/env python3
"""Write the template thumbnails of the shipped workflows, and the pack's icon, from the toy world's result grid.

    python tests/quality/thumbnails.py [--grid docs/toy_world_grid.png]

The grid is what `tests/benchmarks/bench_quality.py --grid` writes from a real run of the pack's
nodes on the trained toy model: one task per row, columns source, reference, VCT, then two
baselines, 64 px cells 4 px apart. Each thumbnail shows one task's source, reference and VCT
output, labelled, two to a line so that it fills the frontend's square template card; the
ControlNet template's also shows the source's edge map, which its ControlNet follows. ComfyUI
serves a thumbnail as `<workflow name>.jpg` beside the workflow. The icon (`docs/icon.png`, the
Icon of pyproject.toml's registry section) shows the subject task as "source + reference ->
VCT" on a square.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
CELL, GAP = 64, 4
# Workflow -> grid row: a task whose reference brings its colour and shape (subject), and one whose
# reference brings its texture and colour (style).
ROWS = {"VCT subject translation": 0, "VCT style transfer": 5, "VCT + ControlNet": 0}
LABELS = ("source", "reference", "VCT")
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


def thumbnail(grid: np.ndarray, row: int, scale: int = 2, with_edges: bool = False) -> Image.Image:
    """Return a grid row's labelled tiles, two per line, on a near-square card: source and reference (or
    source and edges, then reference and VCT), the VCT output centred below when the count is odd."""
    side, pad, label_h = CELL * scale, 16, 28
    tiles = [cell(grid, row, column) for column in range(len(LABELS))]
    labels = list(LABELS)
    if with_edges:
        tiles.insert(1, edges(tiles[0]))
        labels.insert(1, "edges")
    lines = (len(tiles) + 1) // 2
    width, line_h = 2 * side + 3 * pad, side + label_h
    image = Image.new("RGB", (width, lines * line_h + (lines + 1) * pad - pad // 2), (32, 32, 32))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=20)
    for index, (label, array) in enumerate(zip(labels, tiles)):
        line, column = divmod(index, 2)
        alone = index == len(tiles) - 1 and len(tiles) % 2  # the last of an odd count: centred
        x = (width - side) // 2 if alone else pad + column * (side + pad)
        y = pad + line * (line_h + pad)
        image.paste(Image.fromarray(array).resize((side, side), Image.NEAREST), (x, y))
        box = draw.textbbox((0, 0), label, font=font)
        draw.text((x + (side - (box[2] - box[0])) / 2, y + side + 3), label, fill=(235, 235, 235), font=font)
    return image


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
    """Write one JPEG per shipped workflow into example_workflows/ and the icon into docs/."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=Path, default=ROOT / "docs" / "toy_world_grid.png")
    args = ap.parse_args(argv)
    grid = np.asarray(Image.open(args.grid).convert("RGB"))
    for name, row in ROWS.items():
        path = ROOT / "example_workflows" / f"{name}.jpg"
        thumbnail(grid, row, with_edges=name in WITH_EDGES).save(path, quality=90)
        print(path)
    path = ROOT / "docs" / "icon.png"
    icon(grid, ROWS["VCT subject translation"]).save(path, optimize=True)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
