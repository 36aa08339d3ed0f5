"""Scores of a toy-world outcome (running.Runner's), per method: structure (mask IoU with the source),
concept (the reference's colour and texture recognised in the output), their product, B*'s PSNR
where the method has a reconstruction, and the method's cost in seconds and UNet rows.
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
