"""What a user meets in the browser: the shipped templates' layout, thumbnails and model links, the
nodes' labels and defaults, and the loss plots (what Save / Load Inversion show: test_storage.py)."""
from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image
from support import comfy_runner

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "example_workflows"
WORKFLOWS = sorted(TEMPLATES.glob("*.json"))
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT = 30, 20, 24  # the frontend's node metrics, in canvas px
PREVIEW_NODES = {"LoadImage": 220, "SaveImage": 220, "PreviewImage": 160}  # room their image preview needs


def least_height(node: dict) -> int:
    """Return a lower bound of the body height the frontend gives a node: its slots, widgets and preview."""
    if node["type"] in ("Note", "MarkdownNote"):
        return 60
    widgets = comfy_runner.widget_layout(node["type"])
    rows = len(widgets) + sum(w["control"] for w in widgets)
    sockets = [i for i in node.get("inputs", []) if not i.get("widget")]
    return (10 + max(len(sockets), len(node.get("outputs", []))) * SLOT_HEIGHT + rows * WIDGET_HEIGHT
            + PREVIEW_NODES.get(node["type"], 0))


def boxes(workflow: dict) -> dict:
    """Return {node id: (left, top, right, bottom)} including the title bar drawn above `pos`."""
    out = {}
    for node in workflow["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        out[node["id"]] = (x, y - TITLE_HEIGHT, x + w, y + max(h, least_height(node)))
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_template_nodes_never_overlap(path, vct_pack):
    workflow = json.loads(path.read_text())
    found = boxes(workflow)
    overlaps = [(a, b) for (a, ba), (b, bb) in itertools.combinations(found.items(), 2)
                if ba[0] < bb[2] and bb[0] < ba[2] and ba[1] < bb[3] and bb[1] < ba[3]]
    assert not overlaps, f"overlapping nodes (ids) in {path.name}: {overlaps}"


def test_example_workflows_hold_only_templates_and_their_thumbnails():
    files = sorted(p.name for p in TEMPLATES.iterdir())
    stems = {p.stem for p in WORKFLOWS}
    assert stems == {"VCT subject translation", "VCT style transfer", "VCT + ControlNet", "VCT fast translation",
                     "VCT SD3.5 subject translation", "VCT Flux.1 subject translation"}
    assert files == sorted([f"{s}.json" for s in stems] + [f"{s}.jpg" for s in stems])
    assert not (ROOT / "workflows").exists()  # ComfyUI would serve that folder as templates too
    for stem in stems:
        # The frontend asks for `<name>.jpg`: a real JPEG with a picture in it, square like its template cards.
        with Image.open(TEMPLATES / f"{stem}.jpg") as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.size == (512, 512), stem
            low, high = thumbnail.convert("L").getextrema()
            assert high - low > 100, f"{stem}.jpg is nearly uniform"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_templates_link_their_models_for_the_missing_models_dialog(path):
    workflow = json.loads(path.read_text())
    loaders = [n for n in workflow["nodes"] if n["type"] in ("CheckpointLoaderSimple", "ControlNetLoader")]
    assert any(n["type"] == "CheckpointLoaderSimple" for n in loaders)
    for node in loaders:
        models = node["properties"]["models"]
        assert [m["name"] for m in models] == [node["widgets_values"][0]]
        for model in models:
            assert model["directory"] == ("checkpoints" if node["type"] == "CheckpointLoaderSimple" else "controlnet")
            # a file's resolve URL (a /blob/ one downloads the web page, not the file)
            assert re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/" + re.escape(model["name"]),
                                model["url"]), model["url"]
    assert {m["name"] for m in workflow["models"]} == {n["widgets_values"][0] for n in loaders}


def test_templates_name_only_images_comfyui_ships(comfy_session):
    """A fresh ComfyUI opens each template with no missing image: every LoadImage names ComfyUI's own example."""
    shipped = {p.name for p in (comfy_session.comfyui_path / "input").iterdir()}
    for path in WORKFLOWS:
        names = {n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "LoadImage"}
        assert names == {"example.png"}, path.name
        assert names <= shipped, f"{path.name}: {sorted(names - shipped)} not in ComfyUI's input/ ({sorted(shipped)})"


def test_templates_save_under_their_own_prefix():
    prefixes = [n["widgets_values"][0] for path in WORKFLOWS for n in json.loads(path.read_text())["nodes"]
                if n["type"] == "SaveImage"]
    assert len(prefixes) == len(WORKFLOWS) == len(set(prefixes)), prefixes


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_templates_title_their_decodes_and_label_outputs_as_the_nodes_do(path, vct_pack):
    import nodes

    workflow = json.loads(path.read_text())
    decodes = sorted(n.get("title", "") for n in workflow["nodes"] if n["type"] == "VAEDecode")
    assert decodes == ["Decode reconstruction B*", "Decode translation"]
    for node in workflow["nodes"]:
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["type"])
        if node["type"].startswith("VCT") and cls is not None:
            assert [o["name"] for o in node.get("outputs", [])] == list(cls.GET_NODE_INFO_V1()["output_name"])


def output_names(node_id: str) -> list[str]:
    import nodes

    return list(nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()["output_name"])


def test_outputs_are_labelled(vct_pack):
    assert output_names("VCTDualBranchSampler") == ["translation", "reconstruction B*"]
    assert output_names("VCTNullTextInvert") == ["inversion", "loss plot"]
    assert output_names("VCTConceptLearn") == ["conditioning", "concept", "loss plot"]
    # Every node that gives an inversion calls it the same.
    assert output_names("VCTDDIMInvert") == ["inversion", "noise"]
    assert output_names("VCTLoadInversion") == ["inversion"]


def test_a_fresh_concept_node_keeps_its_seed_and_has_a_usable_initializer(pack, vct_pack):
    from support import comfy_tiny

    info = comfy_runner.node_info("VCTConceptLearn")["input"]["required"]
    # No control widget at all: the frontend's defaults to "randomize" whatever the spec says.
    assert info["seed"][1]["control_after_generate"] is False
    assert not [w for w in comfy_runner.widget_layout("VCTConceptLearn") if w["control"]]
    word = info["initializer"][1]["default"]
    assert word.strip()
    clip = comfy_tiny.tiny_sd1_clip()
    encoder = pack.clip_text.clip_encoders(clip, "test")[0]
    assert pack.clip_text.initializer_vectors(encoder, word, 3).shape[0] == 3


def test_loss_plot_axes(pack):
    import importlib

    plots = importlib.import_module(pack.tokens.__name__.rsplit(".", 1)[0] + ".plots")
    for count in (1, 2, 7, 50, 500, 1000, 2500):
        ticks = plots.step_ticks(count)
        assert ticks[0] == 1 and ticks == sorted(set(ticks)) and ticks[-1] <= count and len(ticks) <= 7
        assert count - ticks[-1] <= (ticks[1] - ticks[0] if len(ticks) > 1 else 0)
    assert plots.log_ticks(1e-5, 3e-2) == [1e-5, 1e-4, 1e-3, 1e-2]
    assert plots.log_ticks(0.02, 0.09) == [0.02, 0.05]
    assert len(plots.log_ticks(1e-12, 1e3)) <= 6
    assert plots.log_ticks(0.011, 0.016) == [0.011, 0.016]  # no round value inside: the ends
    assert [plots.tick_label(v) for v in (1e-5, 2e-4, 0.002, 0.5, 12, 1e6)] == ["1e-5", "2e-4", "0.002", "0.5", "12",
                                                                               "1e6"]
    image = plots.loss_curve([math.exp(-i / 40) for i in range(200)], "loss")
    assert tuple(image.shape) == (1, plots.PLOT_SIZE[1], plots.PLOT_SIZE[0], 3)
    assert float(image.min()) < 0.5  # something was drawn



