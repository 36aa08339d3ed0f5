"""Loss curves as IMAGE tensors, drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def loss_curve(
    values: list[float], title: str, log_scale: bool = True, size: tuple[int, int] = (512, 256)
) -> torch.Tensor:
    """Return a [1, H, W, 3] IMAGE of the curve of `values` (log scale by default), titled with the first and last."""
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log_scale)]
    caption = title
    if values:
        caption += f"  first {values[0]:.3g}  last {values[-1]:.3g}  ({len(values)} points)"
    draw.text((8, 6), caption, fill=(0, 0, 0))
    if len(finite) >= 2:
        ys = [math.log10(v) for v in finite] if log_scale else list(finite)
        low, high = min(ys), max(ys)
        span = (high - low) or 1.0
        left, top, right, bottom = 40, 24, width - 10, height - 20
        points = [
            (left + (right - left) * i / (len(ys) - 1), bottom - (bottom - top) * (y - low) / span)
            for i, y in enumerate(ys)
        ]
        draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
        draw.line(points, fill=(30, 90, 200), width=2)
        fmt = (lambda y: f"1e{y:.1f}") if log_scale else (lambda y: f"{y:.3g}")
        draw.text((2, top), fmt(high), fill=(90, 90, 90))
        draw.text((2, bottom - 10), fmt(low), fill=(90, 90, 90))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]
