"""What the headless runner's demo (`run_workflow.py --demo`) needs beside the shipped subject-translation
workflow: the toy world's trained model and two of its images (tools/demo/), the checkpoint loader that
serves that model to ComfyUI's CheckpointLoaderSimple for the demo's run only, the input overrides that
fit the workflow to the toy world, and the labelled result card (also the templates' thumbnails, drawn
by tests/quality/thumbnails.py).

Nothing from ComfyUI is imported at import time. A module of the runner, not a command.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

DEMO_DIR = Path(os.path.abspath(__file__)).parent / "demo"
# The toy world's model (tests/quality/toy_model.py trains it; its name is a hash of the recipe) and
# one of the world's tasks: the source keeps its shape and place, the reference brings its colour.
WEIGHTS = DEMO_DIR / "toy_sd15_3925cb370199.safetensors"
SOURCE, REFERENCE = DEMO_DIR / "source.png", DEMO_DIR / "reference.png"
WORKFLOW = "subject_translation"
# The toy world's pictures are 128 px; "object" is a word none of its captions uses, so the learned
# vectors must find the reference's colour themselves; no embedding file is written.
OVERRIDES = ("ImageScale.width=128", "ImageScale.height=128", "VCTConceptLearn.initializer=object",
             "VCTConceptLearn.embedding_name=", "SaveImage.filename_prefix=vct_demo")
CARD_SIDE, CARD_BACKGROUND, CARD_INK = 512, (32, 32, 32), (235, 235, 235)


@contextlib.contextmanager
def toy_checkpoint(load_trained, weights: Path = WEIGHTS):
    """Within the block, CheckpointLoaderSimple lists `weights` and loads it as the toy model; yield its name.

    The toy model has SD1.5's classes but not its sizes, so ComfyUI's checkpoint detection cannot
    load it: `comfy.sd.load_checkpoint_guess_config`, where every checkpoint loader node ends, is
    wrapped to build it with `load_trained(path, embedding_directory)` (tools/vct_toy.py) for this one
    file and to call the original for any other. The file's folder is added to the checkpoints search
    path. Both are undone after the block.
    """
    import comfy.sd
    import folder_paths

    target, folder = os.path.realpath(weights), str(Path(weights).parent)
    original = comfy.sd.load_checkpoint_guess_config

    def load(ckpt_path, *args, **kwargs):
        if os.path.realpath(ckpt_path) != target:
            return original(ckpt_path, *args, **kwargs)
        model, clip, vae = load_trained(Path(ckpt_path), kwargs.get("embedding_directory"))
        return model, clip, vae, None

    added = folder not in folder_paths.get_folder_paths("checkpoints")
    if added:
        folder_paths.add_model_folder_path("checkpoints", folder)
    folder_paths.filename_list_cache.pop("checkpoints", None)
    comfy.sd.load_checkpoint_guess_config = load
    try:
        yield Path(weights).name
    finally:
        comfy.sd.load_checkpoint_guess_config = original
        paths = folder_paths.folder_names_and_paths["checkpoints"][0]  # the live list, not a copy
        if added and folder in paths:
            paths.remove(folder)
        folder_paths.filename_list_cache.pop("checkpoints", None)


def card(inputs, result, side: int = CARD_SIDE):
    """Return a square card: the labelled `inputs` joined by "+", an arrow, and the labelled `result` below.

    `inputs` is a list of (label, image) and `result` one (label, image), shown larger; images are PIL
    images or uint8 arrays, scaled without smoothing.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    def picture(image, size):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8)) if not isinstance(image, Image.Image) else image
        return image.convert("RGB").resize((size, size), Image.NEAREST)

    margin, label_h, arrow_h = 20, 26, 36
    large = side - 2 * margin - 2 * label_h - arrow_h - side // 4  # 256 at 512
    small = side // 4  # 128 at 512: whole multiples of the 64 and 128 px pictures it is given
    gap = min(64, (side - 2 * margin - len(inputs) * small) // max(1, len(inputs) - 1))
    image = Image.new("RGB", (side, side), CARD_BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, side // 26))

    def label(text, centre_x, top):
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((centre_x - (box[2] - box[0]) / 2, top), text, fill=CARD_INK, font=font)

    row = len(inputs) * small + (len(inputs) - 1) * gap
    for index, (text, tile) in enumerate(inputs):
        left = (side - row) // 2 + index * (small + gap)
        image.paste(picture(tile, small), (left, margin))
        label(text, left + small / 2, margin + small + 3)
        if index:  # "+" in the gap before every input but the first
            x, y, arm = left - gap / 2, margin + small / 2, min(12, gap / 3)
            draw.line((x - arm, y, x + arm, y), fill=CARD_INK, width=4)
            draw.line((x, y - arm, x, y + arm), fill=CARD_INK, width=4)
    centre, top = side // 2, margin + small + label_h + 4
    bottom = top + arrow_h - 8
    draw.line((centre, top, centre, bottom - 8), fill=CARD_INK, width=4)
    draw.polygon([(centre - 10, bottom - 10), (centre + 10, bottom - 10), (centre, bottom)], fill=CARD_INK)
    top = margin + small + label_h + arrow_h
    image.paste(picture(result[1], large), ((side - large) // 2, top))
    label(result[0], centre, top + large + 3)
    return image


def save_card(translation: Path, output_dir) -> Path:
    """Write the demo's card (source + reference -> the saved translation) into `output_dir`; return its path.

    Named like ComfyUI's SaveImage names files: `vct_demo_grid_<counter>_.png`, never replacing one.
    """
    from PIL import Image

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    taken = [p.name for p in output_dir.glob("vct_demo_grid_*_.png")]
    counter = 1 + max((int(n.split("_")[-2]) for n in taken if n.split("_")[-2].isdigit()), default=0)
    path = output_dir / f"vct_demo_grid_{counter:05d}_.png"
    with Image.open(SOURCE) as source, Image.open(REFERENCE) as reference, Image.open(translation) as result:
        picture = card([("source", source), ("reference", reference)], ("VCT translation", result))
    partial = path.with_name(path.name + ".partial")
    picture.save(partial, format="PNG")
    partial.replace(path)
    return path


if __name__ == "__main__":
    sys.exit(f"{Path(__file__).name} is a module of the headless runner, not a command: "
             f"see python {Path(__file__).with_name('run_workflow.py')} --help")
