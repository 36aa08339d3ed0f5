"""Loss curves as IMAGE tensors, drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Drawn at this size and shown scaled to a PreviewImage's width (about 300-400 px), so text is
# drawn large enough to stay legible there.
PLOT_SIZE = (768, 384)
FONT_PX = 22


def _font(px: int):
    return ImageFont.load_default(size=px)  # scalable since Pillow 10.1, which the pack requires


def step_ticks(count: int, most: int = 6) -> list[int]:
    """Return the step numbers (1-based) to label on an x axis of `count` steps: round numbers, at most `most`."""
    if count <= 1:
        return [1] if count == 1 else []
    raw = (count - 1) / max(1, most - 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    ticks = [1] + [t for t in range(step, count + 1, step) if t > 1]
    if count - ticks[-1] > step / 2:
        ticks.append(count)
    return ticks


def log_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Return the values to label on a log-scale y axis spanning [low, high] (> 0): 1-2-5 steps or decades."""
    if not (low > 0 and high >= low):
        return []
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for mantissas in ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 5), (1,)):
        ticks = [m * 10.0**k for k in range(first, last + 1) for m in mantissas if low <= m * 10.0**k <= high]
        if len(ticks) <= most:
            break
    if len(ticks) > most:  # many decades: every n-th one
        ticks = ticks[:: math.ceil(len(ticks) / most)]
    if len(ticks) < 2:  # less than one 1-2-5 step in range: label the ends
        ticks = [low, high] if high > low else [low]
    return ticks


def tick_label(value: float) -> str:
    """Return a short, readable label for a positive axis value (0.002, 50, 1e-05 -> '1e-5')."""
    if 1e-3 <= value < 1e5:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def loss_curve(values: list[float], title: str) -> torch.Tensor:
    """Return a [1, H, W, 3] IMAGE of the curve of `values` per step on a log-scale y axis, titled with the last."""
    width, height = PLOT_SIZE
    image = Image.new("RGB", PLOT_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(FONT_PX), _font(FONT_PX - 4)
    finite = [(i + 1, v) for i, v in enumerate(values) if math.isfinite(v) and v > 0]
    caption = title + (f"   last {values[-1]:.3g}" if values else "")
    draw.text((12, 8), caption, fill=(0, 0, 0), font=font)
    if len(finite) < 2:
        draw.text((12, 48), "nothing to plot" if not values else "too few finite values to plot",
                  fill=(90, 90, 90), font=small)
        return _to_image(image)
    left, top, right, bottom = 92, 48, width - 20, height - 52
    lows, highs = min(v for _, v in finite), max(v for _, v in finite)
    ys = [math.log10(v) for _, v in finite]
    low, high = math.log10(lows), math.log10(highs)
    span = (high - low) or 1.0
    count = len(values)

    def to_x(step: float) -> float:
        return left + (right - left) * (step - 1) / max(1, count - 1)

    def to_y(y: float) -> float:
        return bottom - (bottom - top) * (y - low) / span

    draw.rectangle((left, top, right, bottom), outline=(170, 170, 170))
    for value in log_ticks(lows, highs):
        y = to_y(math.log10(value))
        draw.line((left - 6, y, right, y), fill=(225, 225, 225))
        label = tick_label(value)
        box = draw.textbbox((0, 0), label, font=small)
        draw.text((left - 10 - (box[2] - box[0]), y - (box[3] - box[1]) / 2 - 2), label, fill=(60, 60, 60),
                  font=small)
    for step in step_ticks(count):
        x = to_x(step)
        draw.line((x, bottom, x, bottom + 6), fill=(120, 120, 120))
        label = str(step)
        box = draw.textbbox((0, 0), label, font=small)
        draw.text((x - (box[2] - box[0]) / 2, bottom + 8), label, fill=(60, 60, 60), font=small)
    axis = "step   (y: log scale)"
    box = draw.textbbox((0, 0), axis, font=small)
    draw.text(((left + right - (box[2] - box[0])) / 2, height - 24), axis, fill=(90, 90, 90), font=small)
    draw.line([(to_x(step), to_y(y)) for (step, _), y in zip(finite, ys)], fill=(30, 90, 200), width=3)
    return _to_image(image)


def _to_image(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]
