"""Scores of a toy-world outcome (running.Runner's), per method: structure (mask IoU with the source),
concept (the reference's colour and texture recognised in the output), their product, placement
(IoU of the output object's bounding box with the source's, which counts where the object is and
how big, not its outline), background PSNR (the output against the source outside both objects,
the source's and the output's), whether the reference's texture was taken when it is patterned,
B*'s PSNR where the method has a reconstruction, and the method's cost in seconds and UNet rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import world

if TYPE_CHECKING:  # harness and running start ComfyUI when imported
    from harness import Method, Task
    from running import Outcome

CONCEPT_ATTRIBUTES = ("colour", "texture")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Return the PSNR in dB of two images in [0, 1]."""
    mse = float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """Return the box `[row0, col0, row1, col1]` (exclusive ends) around a mask's pixels, all zero when empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return np.zeros(4, dtype=int)
    return np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Return the intersection over union of two boxes (0 when either is empty)."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def grow(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Return the mask grown by `pixels` in every direction (edges of an object are neither object nor background)."""
    out = mask.copy()
    for _ in range(pixels):
        padded = np.pad(out, 1)
        out = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])
    return out


def background_psnr(image: np.ndarray, source: np.ndarray, source_mask: np.ndarray, found_mask: np.ndarray) -> float:
    """Return the PSNR of the output against the source outside both objects (grown by a pixel)."""
    keep = ~grow(source_mask | found_mask)
    if not keep.any():
        return float("nan")
    return psnr(np.asarray(image)[keep], np.asarray(source)[keep])


def score_image(image: np.ndarray, task: Task, source: np.ndarray | None = None) -> dict:
    """Return structure, concept and their product for one output of a task, placement and background, plus what
    was recognised."""
    found = world.analyse(image)
    source_mask = world.true_mask(task.source)
    structure = world.iou(found.mask, source_mask)
    hits = [found.attributes()[a] == task.reference.attributes()[a] for a in CONCEPT_ATTRIBUTES]
    concept = float(np.mean(hits))
    source = world.render(task.source) if source is None else source
    row = {"structure": structure, "concept": concept, "both": float(all(hits)), "score": structure * concept,
           "shape_kept": float(found.shape == task.source.shape), "found": found.attributes(),
           "placement": box_iou(bounding_box(found.mask), bounding_box(source_mask)),
           "background": background_psnr(image, source, source_mask, found.mask)}
    if task.reference.texture != "plain":
        row["texture_taken"] = float(found.texture == task.reference.texture)
    return row


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
        per = [score_image(img, outcome.task, source) for img in images]
        keys = ("structure", "concept", "both", "score", "shape_kept", "placement", "background", "texture_taken")
        row = {key: float(np.mean([p[key] for p in per])) for key in keys if key in per[0]}
        row["found"] = per[0]["found"]
        rec = outcome.images.get((m.name, "reconstruction"))
        if rec is not None:
            row["psnr"] = psnr(rec[0], source)
        row.update(method_cost(outcome, m))
        rows[m.name] = row
    return rows


def method_mean(scores: list[dict], method: str, column: str) -> float:
    """Return the mean of one column of one method over the tasks (scores as `score` gives them) that ran it."""
    values = [s[method][column] for s in scores if method in s]
    assert values, f"{method} did not run"
    return float(np.mean(values))
