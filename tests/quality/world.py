"""A procedural image world with known ground truth, for measuring whether VCT translates.

Every image holds one object on a lightly varied grey background. The object has a shape
(circle, square, triangle), a colour (six hues) and a texture (plain, striped, checkered), and
sits at a random position and size. Images are `SIDE x SIDE` RGB arrays in [0, 1]: one pixel
per latent position, since the toy model's latent encoding is the picture itself (see
`toy_model.py`). Everything is deterministic from a seed (NumPy's PCG64).

Ground truth per image: the object's mask (pixel coverage >= 0.5) and its attributes. The
analysers (`analyse`) recover both from an image by hand-made rules; their accuracy on held-out
images is measured by `analyser_accuracy` and asserted in the core tier.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

SIDE = 16
SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> hue in degrees
    "red": 0.0,
    "yellow": 55.0,
    "green": 120.0,
    "cyan": 185.0,
    "blue": 225.0,
    "magenta": 300.0,
}
TEXTURES = ("plain", "striped", "checkered")
SATURATION, VALUE = 0.85, 0.9
DARK = 0.35  # the dark bands of a pattern are the colour at this brightness
PERIOD = 4  # stripes and checks: 2 pixels on, 2 off
SUPERSAMPLE = 4
RADIUS = (3.5, 6.0)


@dataclass(frozen=True)
class Scene:
    """One object: attributes, centre (x, y) and radius in pixels, and the background's look."""

    shape: str
    colour: str
    texture: str
    cx: float
    cy: float
    radius: float
    background: tuple  # base grey per channel
    gradient: tuple  # (dx, dy) brightness change across the image

    def caption(self) -> str:
        """Return the caption, e.g. 'a red striped circle' ('plain' is left out: 'a red circle')."""
        words = [self.colour] + ([] if self.texture == "plain" else [self.texture]) + [self.shape]
        return "a " + " ".join(words)

    def attributes(self) -> dict:
        """Return the object's attributes as a dict."""
        return {"shape": self.shape, "colour": self.colour, "texture": self.texture}


def rgb(colour: str, value: float = VALUE) -> np.ndarray:
    """Return the RGB of a palette colour at the given brightness."""
    return np.array(colorsys.hsv_to_rgb(COLOURS[colour] / 360.0, SATURATION, value))


def random_scene(rng: np.random.Generator, **fixed) -> Scene:
    """Return a random scene; any attribute or geometry given in `fixed` is kept as given."""
    radius = fixed.pop("radius", None)
    if radius is None:
        radius = float(rng.uniform(*RADIUS))
    margin = radius + 0.5
    values = {
        "shape": str(rng.choice(SHAPES)),
        "colour": str(rng.choice(list(COLOURS))),
        "texture": str(rng.choice(TEXTURES)),
        "cx": float(rng.uniform(margin, SIDE - margin)),
        "cy": float(rng.uniform(margin, SIDE - margin)),
        "background": tuple(float(v) for v in 0.8 + rng.uniform(-0.04, 0.04, 3)),
        "gradient": tuple(float(v) for v in rng.uniform(-0.06, 0.06, 2)),
    }
    values.update(fixed)
    return Scene(radius=radius, **values)


def coverage(shape: str, cx: float, cy: float, radius: float, side: int = SIDE) -> np.ndarray:
    """Return the fraction of every pixel that a shape covers (supersampled), `[side, side]`."""
    n = SUPERSAMPLE
    offsets = (np.arange(n) + 0.5) / n
    ys = (np.arange(side)[:, None] + offsets[None, :]).reshape(-1)
    xs = ys.copy()
    y, x = np.meshgrid(ys - cy, xs - cx, indexing="ij")
    if shape == "circle":
        inside = x * x + y * y <= radius * radius
    elif shape == "square":
        half = radius * 0.85  # about the circle's area
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":
        # Upward equilateral triangle around the centre, circumradius 1.25 r (about the circle's area).
        r = radius * 1.25
        top, bottom = -r, r / 2
        half_width = (y - top) / (bottom - top) * (r * np.sqrt(3) / 2)
        inside = (y >= top) & (y <= bottom) & (np.abs(x) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(side, n, side, n).mean(axis=(1, 3))


def pattern(texture: str, side: int = SIDE) -> np.ndarray:
    """Return 1 where a texture shows the full colour and 0 where it shows the dark colour."""
    yy, xx = np.mgrid[0:side, 0:side]
    bright_row = (yy % PERIOD) < PERIOD // 2
    if texture == "plain":
        return np.ones((side, side))
    if texture == "striped":
        return bright_row.astype(float)
    if texture == "checkered":
        bright_col = (xx % PERIOD) < PERIOD // 2
        return (bright_row == bright_col).astype(float)
    raise ValueError(f"unknown texture {texture!r}")


def render(scene: Scene) -> np.ndarray:
    """Return the scene as a `[SIDE, SIDE, 3]` float image in [0, 1]."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1) - 0.5
    shade = scene.gradient[0] * xx + scene.gradient[1] * yy
    background = np.array(scene.background)[None, None, :] + shade[..., None]
    bright, dark = rgb(scene.colour), rgb(scene.colour, VALUE * DARK)
    p = pattern(scene.texture)[..., None]
    obj = p * bright + (1 - p) * dark
    cover = coverage(scene.shape, scene.cx, scene.cy, scene.radius)[..., None]
    return np.clip(cover * obj + (1 - cover) * background, 0.0, 1.0)


def true_mask(scene: Scene) -> np.ndarray:
    """Return the ground-truth object mask (coverage >= 0.5)."""
    return coverage(scene.shape, scene.cx, scene.cy, scene.radius) >= 0.5


def dataset(seed: int, count: int) -> list[Scene]:
    """Return `count` random scenes, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# analysers: image -> mask and attributes, by rules
# ----------------------------------------------------------------------------------------------

MASK_DISTANCE = 0.2


@dataclass(frozen=True)
class Analysis:
    """What the analysers read off an image."""

    mask: np.ndarray
    shape: str | None
    colour: str | None
    texture: str | None

    def attributes(self) -> dict:
        """Return the recognised attributes as a dict (None where no object was found)."""
        return {"shape": self.shape, "colour": self.colour, "texture": self.texture}


def _background(image: np.ndarray) -> np.ndarray:
    # A plane per channel fitted to the border pixels, where the object never is... mostly: the
    # fit is robust to a few object pixels through one round of outlier rejection.
    side = image.shape[0]
    border = np.zeros((side, side), bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1) - 0.5
    design = np.stack([np.ones(border.sum()), xx[border], yy[border]], axis=1)
    values = image[border]
    keep = np.ones(len(values), bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        residual = np.linalg.norm(design @ coef - values, axis=1)
        keep = residual < max(0.08, np.median(residual) * 3)
    full = np.stack([np.ones(side * side), xx.reshape(-1), yy.reshape(-1)], axis=1)
    return (full @ coef).reshape(side, side, 3)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    side = mask.shape[0]
    labels = np.zeros(mask.shape, int)
    best, best_size, label = None, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        stack, size = [start], 0
        labels[start] = label
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < side and 0 <= nx < side and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best is not None else np.zeros_like(mask)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    # Background is what the border reaches through non-mask pixels; everything else is object.
    outside = _largest_component(np.pad(~mask, 1, constant_values=True))[1:-1, 1:-1]
    return ~outside


def object_mask(image: np.ndarray) -> np.ndarray:
    """Return the object's mask: pixels far from the fitted background, largest component, holes filled."""
    distance = np.linalg.norm(image - _background(image), axis=-1)
    core = distance > MASK_DISTANCE
    if core.any():
        # Edge pixels are a mix of object and background: count those at least half covered,
        # judged against the object's own contrast with the background.
        core = distance > max(MASK_DISTANCE, 0.5 * float(np.median(distance[core])))
    mask = _largest_component(core)
    return _fill_holes(mask) if mask.any() else mask


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def classify_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """Return the palette colour nearest in hue to the object's brighter half."""
    pixels = image[mask]
    value = pixels.max(axis=1)
    bright = pixels[value >= np.median(value)].mean(axis=0)
    hue = colorsys.rgb_to_hsv(*bright)[0] * 360.0
    return min(COLOURS, key=lambda name: _hue_distance(hue, COLOURS[name]))


def classify_texture(image: np.ndarray, mask: np.ndarray) -> str:
    """Return 'plain', 'striped' or 'checkered' from how brightness varies across rows and columns."""
    inner = mask.copy()
    # Edge pixels mix object and background; judge the texture on the object's interior.
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    if inner.sum() < 6:
        inner = mask
    value = image.max(axis=-1)
    top = value[inner].max()
    b = value / max(top, 1e-6)
    vals = b[inner]
    if vals.std() < 0.15:
        return "plain"
    # Patterns have period 4: compare each pixel with the one 2 rows / 2 columns away, which is
    # the opposite band for stripes (rows) and for checks (both).
    def contrast(dy: int, dx: int) -> float:
        side = b.shape[0]
        a = b[max(0, -dy): side - max(0, dy), max(0, -dx): side - max(0, dx)]
        c = b[max(0, dy):, max(0, dx):][: a.shape[0], : a.shape[1]]
        m = inner[max(0, -dy): side - max(0, dy), max(0, -dx): side - max(0, dx)]
        m = m & inner[max(0, dy):, max(0, dx):][: a.shape[0], : a.shape[1]]
        return float(np.abs(a - c)[m].mean()) if m.any() else 0.0

    rows, cols = contrast(2, 0), contrast(0, 2)
    if rows > 2 * cols:
        return "striped"
    if cols > 0.5 * rows and rows > 0.5 * cols:
        return "checkered"
    return "other"


def classify_shape(mask: np.ndarray) -> str:
    """Return the shape whose template, fitted to the mask's centroid and area, overlaps it best."""
    area = mask.sum()
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    best, best_iou = None, -1.0
    for shape in SHAPES:
        # Radius of this shape with the mask's area (the shapes are scaled to about pi r^2).
        unit = coverage(shape, SIDE / 2, SIDE / 2, 4.0).sum() / 16.0
        radius = float(np.sqrt(area / unit))
        # Every shape is centred on its centroid (the triangle's circumcentre is its centroid).
        template = coverage(shape, cx, cy, radius, mask.shape[0]) >= 0.5
        overlap = iou(template, mask)
        if overlap > best_iou:
            best, best_iou = shape, overlap
    return best


def analyse(image: np.ndarray) -> Analysis:
    """Return the object's mask and attributes as read off an `[H, W, 3]` image in [0, 1]."""
    image = np.asarray(image, dtype=np.float64)
    mask = object_mask(image)
    if mask.sum() < 4:
        return Analysis(mask, None, None, None)
    return Analysis(mask, classify_shape(mask), classify_colour(image, mask), classify_texture(image, mask))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Return the intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def degrade(image: np.ndarray, rng: np.random.Generator, noise: float = 0.04, blur: float = 0.25) -> np.ndarray:
    """Return the image with a little blur and noise, as a generated image would have."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    neighbours = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4
    out = (1 - blur) * image + blur * neighbours + rng.normal(0, noise, image.shape)
    return np.clip(out, 0.0, 1.0)


def analyser_accuracy(seed: int = 12345, count: int = 500, degraded: bool = False) -> dict:
    """Return the analysers' accuracy per attribute and mean mask IoU on held-out scenes."""
    rng = np.random.default_rng(seed + 1)
    scenes = dataset(seed, count)
    hits = {"shape": 0, "colour": 0, "texture": 0}
    ious = []
    for scene in scenes:
        image = render(scene)
        if degraded:
            image = degrade(image, rng)
        found = analyse(image)
        for key in hits:
            hits[key] += found.attributes()[key] == scene.attributes()[key]
        ious.append(iou(found.mask, true_mask(scene)))
    result = {key: value / count for key, value in hits.items()}
    result["mask_iou"] = float(np.mean(ious))
    return result
