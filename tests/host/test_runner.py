"""tools/run_workflow.py, the headless runner, inside the test session's ComfyUI (already bootstrapped)."""
from __future__ import annotations

import copy
import logging
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import comfy_runner
from test_workflows import workflow_family

rw = comfy_runner.run_workflow
SHIPPED = sorted(rw.shipped_workflows())
SMALL = ["ImageScale.width=32", "ImageScale.height=32", "VCTDDIMInvert.steps=3", "VCTNullTextInvert.inner_steps=2",
         "VCTConceptLearn.steps=2", "VCTConceptLearn.grad_accum=1", "VCTConceptLearn.embedding_name="]


def small_for(prompt: dict) -> list[str]:
    """Return the SMALL overrides that name a node class the prompt has."""
    # Flux's template has no null-text node, and `--set` on a class the workflow lacks is an error.
    classes = {v["class_type"] for v in prompt.values()}
    return [s for s in SMALL if s.split(".")[0] in classes]


def write_image(path: Path, width: int = 40, height: int = 48, seed: int = 0) -> Path:
    """Write a random RGB image (format from the suffix) and return its path."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def staged(comfy_session):
    """Remove what the runner copies into the session's input/vct/ folder."""
    yield comfy_session.input_dir / "vct"
    shutil.rmtree(comfy_session.input_dir / "vct", ignore_errors=True)


def test_the_tools_load_nothing_from_the_pack_folders():
    """The tools load their sibling files only; nodes/ (ComfyUI glue) is never loaded by path."""
    for path in sorted(rw.TOOLS_DIR.glob("*.py")):
        source = path.read_text()
        assert not re.search(r"/\s*[\"']nodes[\"']", source), f"{path.name} joins a path to nodes/"
        assert all("TOOLS_DIR" in call for call in re.findall(r"(?<!def )_load_file\([^)]*\)", source)), path.name


def test_runner_module_imports_nothing_from_comfyui():
    source = (rw.TOOLS_DIR / "run_workflow.py").read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if any(m in line for m in ("comfy", "nodes", "execution", "server",
                                                                       "folder_paths", "torch", "PIL"))]


@pytest.mark.parametrize("workflow", SHIPPED)
def test_run_shipped_workflow_to_a_saved_png(workflow, vct_pack, tiny_checkpoint, comfy_session, tmp_path, staged,
                                             caplog):
    family = workflow_family(rw.resolve_workflow(workflow))  # sd15, or sd3 / flux for the transformer templates
    ckpt = tiny_checkpoint.add(f"vct_runner_tiny_{family}.safetensors", seed=1, family=family)
    prompt = rw.api_prompt_from_file(rw.resolve_workflow(workflow))
    for node in prompt.values():
        if node["class_type"] == "ControlNetLoader":
            tiny_checkpoint.add_controlnet(node["inputs"]["control_net_name"])
    source = write_image(tmp_path / "photo.png", seed=1)
    reference = write_image(tmp_path / "dog.jpg", width=36, height=30, seed=2)
    assert rw.bootstrap(comfy_session.comfyui_path) is False, "the session's ComfyUI is detected and reused"
    with caplog.at_level(logging.INFO, logger="vct.run_workflow"):
        saved = rw.run(comfy_session.comfyui_path, workflow, ckpt, source, reference, small_for(prompt), cpu=True)
    assert saved and all(p.is_absolute() and p.is_file() and p.suffix == ".png" for p in saved)
    assert all(p.parent == comfy_session.output_dir for p in saved)
    assert Image.open(saved[0]).size == (32, 32)
    assert len(tiny_checkpoint.calls) == 1 and tiny_checkpoint.calls[0]["ckpt_path"].endswith(ckpt)
    assert tiny_checkpoint.calls[0]["family"] == family
    assert sorted(p.suffix for p in staged.iterdir()) == [".jpg", ".png"], "both images copied to input/vct/"
    assert "VCTDualBranchSampler" in caplog.text and "[1/" in caplog.text, "a progress line per node"
    for p in saved:
        p.unlink()


@pytest.mark.parametrize("workflow", SHIPPED)
def test_source_and_reference_loaders_come_from_the_links(workflow, vct_pack):
    prompt = rw.api_prompt_from_file(rw.resolve_workflow(workflow))
    source, reference = rw.find_image_loaders(prompt)
    assert prompt[source]["_meta"]["title"].startswith("Source image")
    assert prompt[reference]["_meta"]["title"].startswith("Reference image")
    # rewire: each VAEEncode now takes the other ImageScale, so the roles swap
    encoders = [k for k, v in prompt.items() if v["class_type"] == "VAEEncode"]
    a, b = (prompt[k]["inputs"] for k in encoders)
    a["pixels"], b["pixels"] = b["pixels"], a["pixels"]
    assert rw.find_image_loaders(prompt) == (reference, source)
    del prompt[reference]
    with pytest.raises(rw.UsageError, match="source image.*VCTDDIMInvert"):
        rw.find_image_loaders(prompt)


def test_the_converter_titles_nodes_as_the_frontend_does(vct_pack):
    """An untitled node's `_meta.title` is its display name (the frontend's default title); a set title wins."""
    import nodes

    prompt = rw.api_prompt_from_file(rw.resolve_workflow("subject_translation"))
    by_class = {v["class_type"]: v["_meta"]["title"] for v in prompt.values()}
    assert by_class["CheckpointLoaderSimple"] == nodes.NODE_DISPLAY_NAME_MAPPINGS["CheckpointLoaderSimple"]
    assert by_class["VCTDDIMInvert"] == nodes.NODE_CLASS_MAPPINGS["VCTDDIMInvert"].GET_NODE_INFO_V1()["display_name"]
    assert by_class["VCTDDIMInvert"] != "VCTDDIMInvert"
    assert by_class["ImageScale"].startswith(("Source to", "Reference to"))


@pytest.mark.parametrize("module", ["vct_ui_to_api.py", "vct_execute.py", "vct_demo.py", "vct_toy.py"])
def test_the_runners_modules_say_they_are_not_commands(module):
    done = subprocess.run([sys.executable, str(rw.TOOLS_DIR / module), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "not a command" in done.stderr and "run_workflow.py" in done.stderr
    assert done.stdout == ""


def test_resolve_workflow_names():
    assert SHIPPED == ["controlnet", "fast_translation", "flux_translation", "sd35_translation", "style_transfer",
                       "subject_translation"]
    assert rw.resolve_workflow("controlnet") == (rw.WORKFLOWS_DIR / "VCT + ControlNet.json").resolve()
    for name in ("subject_translation", "vct_subject_translation", "VCT subject translation.json"):
        assert rw.resolve_workflow(name) == (rw.WORKFLOWS_DIR / "VCT subject translation.json").resolve()
    for name in ("sd35_translation", "VCT SD3.5 subject translation.json", "sd3_5_subject_translation"):
        assert rw.resolve_workflow(name) == (rw.WORKFLOWS_DIR / "VCT SD3.5 subject translation.json").resolve()
    for name in ("flux_translation", "VCT Flux.1 subject translation.json", "flux_1_subject_translation"):
        assert rw.resolve_workflow(name) == (rw.WORKFLOWS_DIR / "VCT Flux.1 subject translation.json").resolve()
    with pytest.raises(rw.UsageError, match="shipped: .*flux_translation, sd35_translation, style_transfer"):
        rw.resolve_workflow("no_such_workflow")


def test_the_help_names_every_shipped_workflow(capsys):
    with pytest.raises(SystemExit) as stopped:
        rw.main(["--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert all(name in text for name in SHIPPED), text


def test_set_parsing_and_clear_errors(vct_pack):
    assert rw.parse_override("VCTConceptLearn.steps=200") == ("VCTConceptLearn", "steps", 200)
    assert rw.parse_override("VCTDualBranchSampler.self_injection=0.8") == ("VCTDualBranchSampler",
                                                                           "self_injection", 0.8)
    assert rw.parse_override("11.overwrite=True") == ("11", "overwrite", True)
    assert rw.parse_override("VCTNullTextInvert.early_stop=1e-5")[2] == pytest.approx(1e-5)
    assert rw.parse_override("VCTConceptLearn.initializer=a=b") == ("VCTConceptLearn", "initializer", "a=b")
    assert rw.parse_override('VCTConceptLearn.initializer="42"')[2] == "42"
    assert rw.parse_override("VCTConceptLearn.embedding_name=")[2] == ""
    for bad in ("steps=3", "VCTConceptLearn.steps", ".steps=3", "VCTConceptLearn.=3"):
        with pytest.raises(rw.UsageError, match="CLASS_OR_ID.input=value"):
            rw.parse_override(bad)

    prompt = rw.api_prompt_from_file(rw.resolve_workflow("subject_translation"))
    rw.apply_overrides(prompt, ["VCTConceptLearn.steps=7", "4.width=64", ("ImageScale", "height", 24)])
    assert prompt["11"]["inputs"]["steps"] == 7
    assert prompt["4"]["inputs"]["width"] == 64 and prompt["5"]["inputs"]["width"] == 512
    assert prompt["4"]["inputs"]["height"] == prompt["5"]["inputs"]["height"] == 24
    with pytest.raises(rw.UsageError, match="no node with id or class 'KSampler'.*VCTConceptLearn"):
        rw.apply_overrides(prompt, ["KSampler.steps=3"])
    with pytest.raises(rw.UsageError, match="VCTConceptLearn has no input 'stpes'.*steps"):
        rw.apply_overrides(prompt, ["VCTConceptLearn.stpes=3"])
    with pytest.raises(rw.UsageError, match="connected to another node"):
        rw.apply_overrides(prompt, ["VCTConceptLearn.latent=3"])


def test_main_with_a_missing_source_exits_2(comfy_session, tmp_path, caplog):
    reference = write_image(tmp_path / "dog.png")
    argv = ["--comfyui", str(comfy_session.comfyui_path), "--workflow", "subject_translation",
            "--source", str(tmp_path / "missing.jpg"), "--reference", str(reference)]
    assert rw.main(argv) == 2
    assert "--source" in caplog.text and "missing.jpg" in caplog.text and "no such file" in caplog.text


def test_main_with_an_unknown_checkpoint_exits_2_with_the_node_error(vct_pack, comfy_session, tmp_path, staged,
                                                                     caplog, capsys):
    source, reference = write_image(tmp_path / "photo.png"), write_image(tmp_path / "dog.png", seed=3)
    argv = ["--comfyui", str(comfy_session.comfyui_path), "--workflow", "style_transfer", "--checkpoint",
            "no_such_model.safetensors", "--source", str(source), "--reference", str(reference)]
    assert rw.main(argv) == 2
    assert "invalid prompt" in caplog.text and "CheckpointLoaderSimple" in caplog.text
    assert "no_such_model.safetensors" in caplog.text
    assert capsys.readouterr().out == "", "nothing on stdout when nothing was saved"


def test_main_prints_the_saved_paths(vct_pack, tiny_checkpoint, comfy_session, tmp_path, staged, capsys):
    source, reference = write_image(tmp_path / "photo.png"), write_image(tmp_path / "dog.png", seed=3)
    argv = ["--comfyui", str(comfy_session.comfyui_path), "--workflow", str(rw.resolve_workflow("style_transfer")),
            "--checkpoint", tiny_checkpoint.name, "--source", str(source), "--reference", str(reference), "--cpu"]
    argv += [a for s in SMALL for a in ("--set", s)]
    assert rw.main(argv) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert printed and all(p.is_absolute() and p.is_file() for p in printed)
    for p in printed:
        p.unlink()


def test_a_failing_node_exits_1(vct_pack, tiny_checkpoint, comfy_session, tmp_path, staged, caplog):
    source, reference = write_image(tmp_path / "photo.png"), write_image(tmp_path / "dog.png", seed=3)
    argv = ["--comfyui", str(comfy_session.comfyui_path), "--workflow", "subject_translation",
            "--checkpoint", tiny_checkpoint.name, "--source", str(source), "--reference", str(reference)]
    argv += [a for s in [*SMALL, "VCTConceptLearn.initializer=  "] for a in ("--set", s)]
    assert rw.main(argv) == 1
    assert "VCTConceptLearn" in caplog.text and "failed" in caplog.text


# ---------------------------------------------------------------------------------------------- bootstrap pieces

class OldServer:
    """0.3.64's constructor shape: PromptServer(loop)."""

    def __init__(self, loop):
        self.loop = loop


class NewServer:
    """0.38.x's constructor shape: PromptServer(loop, asset_manager), no default."""

    def __init__(self, loop, asset_manager):
        self.loop, self.asset_manager = loop, asset_manager


def test_the_prompt_server_is_built_for_the_constructor_it_has(monkeypatch):
    loop = object()
    old = rw.prompt_server(types.SimpleNamespace(PromptServer=OldServer), loop)
    assert type(old) is OldServer and old.loop is loop

    class NoAssets:  # 0.38.x's app.assets.manager.NoAssets: assets off, no database
        def __init__(self, args):
            self.args, self.enabled = args, False

    manager = types.ModuleType("app.assets.manager")
    manager.NoAssets = NoAssets
    manager.default_asset_manager = lambda: pytest.fail("the runner must not start the asset system")
    monkeypatch.setitem(sys.modules, "app.assets.manager", manager)
    new = rw.prompt_server(types.SimpleNamespace(PromptServer=NewServer), loop)
    assert type(new) is NewServer and new.loop is loop
    assert type(new.asset_manager) is NoAssets and new.asset_manager.enabled is False

    del manager.NoAssets  # a 0.38.x build without NoAssets: its own default manager
    manager.default_asset_manager = lambda: "default"
    assert rw.prompt_server(types.SimpleNamespace(PromptServer=NewServer), loop).asset_manager == "default"


def test_a_governed_builds_policy_module_is_found_where_comfyui_has_one(monkeypatch):
    """0.38.x's main.py applies app.governance's signed policy; the runner does too, and 0.3.64 has none."""
    assert rw.governance() is None or callable(rw.governance().initialize)
    stand_in = types.ModuleType("app.governance")
    stand_in.initialize, stand_in.apply_disabled_nodes = (lambda: None), (lambda disabled: None)
    monkeypatch.setitem(sys.modules, "app.governance", stand_in)
    assert rw.governance() is stand_in


@pytest.fixture
def saved_folder_paths():
    """Restore ComfyUI's model folder list after a test that adds to it."""
    import folder_paths

    saved = copy.deepcopy(folder_paths.folder_names_and_paths)
    yield folder_paths
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


def write_paths(path: Path, models: Path) -> Path:
    """Write an extra-model-paths file that adds `models`/<name> to checkpoints and embeddings."""
    path.write_text(f"mine:\n  base_path: {models}\n  checkpoints: ckpts\n  embeddings: emb\n")
    return path


def test_path_configs_are_read_in_comfyuis_order(comfy_session, tmp_path, saved_folder_paths, caplog):
    folder_paths = saved_folder_paths
    root = tmp_path / "ComfyUI"
    root.mkdir()
    assert rw.load_path_configs(root) == []
    output_ckpts = str(Path(folder_paths.get_output_directory()) / "checkpoints")
    assert output_ckpts in folder_paths.get_folder_paths("checkpoints"), "main.py adds output/checkpoints too"

    older = write_paths(root / "extra_model_paths.yaml", tmp_path / "old")
    assert rw.load_path_configs(root) == [older]
    assert str(tmp_path / "old" / "ckpts") in folder_paths.get_folder_paths("checkpoints")

    newer = write_paths(root / "extra_paths.yaml", tmp_path / "new")
    with caplog.at_level(logging.WARNING, logger="vct.run_workflow"):
        assert rw.load_path_configs(root) == [newer], "extra_paths.yaml first; then extra_model_paths.yaml is ignored"
    assert str(tmp_path / "new" / "emb") in folder_paths.get_folder_paths("embeddings")
    assert "ignoring the deprecated extra_model_paths.yaml" in caplog.text


def test_extra_paths_yaml_may_name_system_folders_where_the_loader_allows_it(comfy_session, tmp_path, monkeypatch,
                                                                            saved_folder_paths):
    import utils.extra_config

    calls = []

    def newer_loader(yaml_path, allow_system_dirs=False):  # 0.38.x's shape
        calls.append((Path(yaml_path).name, allow_system_dirs))

    monkeypatch.setattr(utils.extra_config, "load_extra_path_config", newer_loader)
    write_paths(tmp_path / "extra_paths.yaml", tmp_path / "new")
    write_paths(tmp_path / "extra_model_paths.yaml", tmp_path / "old")
    rw.load_path_configs(tmp_path)
    assert calls == [("extra_paths.yaml", True)]
    (tmp_path / "extra_paths.yaml").unlink()
    rw.load_path_configs(tmp_path)
    assert calls[-1] == ("extra_model_paths.yaml", False)


# ---------------------------------------------------------------------------------------------- the demo

# The demo's graph at a few steps each; the full run (about a minute alone on 2 CPU cores) is CI's own command.
FAST_DEMO = ["VCTConceptLearn.steps=3", "VCTConceptLearn.grad_accum=1", "VCTDDIMInvert.steps=4",
             "VCTNullTextInvert.inner_steps=2"]


def test_the_demo_translates_the_toy_images_and_prints_its_card(vct_pack, comfy_session, staged, capsys, caplog):
    import comfy.sd
    import folder_paths

    before = comfy.sd.load_checkpoint_guess_config, list(folder_paths.get_folder_paths("checkpoints"))
    embeddings = sorted(comfy_session.folder("embeddings").iterdir())
    argv = ["--comfyui", str(comfy_session.comfyui_path), "--demo", *[a for s in FAST_DEMO for a in ("--set", s)]]
    with caplog.at_level(logging.INFO, logger="vct.run_workflow"):
        assert rw.main(argv) == 0
    translation, card = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert translation.parent == card.parent == comfy_session.output_dir
    assert translation.name.startswith("vct_demo_") and Image.open(translation).size == (128, 128)
    assert card.name.startswith("vct_demo_grid_") and Image.open(card).size == (512, 512)
    assert "VCTDualBranchSampler" in caplog.text and f"result card (source + reference -> VCT translation): {card}" \
        in caplog.text
    # the toy checkpoint is served for the demo's run only; no embedding is written
    assert (comfy.sd.load_checkpoint_guess_config, folder_paths.get_folder_paths("checkpoints")) == before
    assert rw.showing.WEIGHTS.name not in folder_paths.get_filename_list("checkpoints")
    assert sorted(comfy_session.folder("embeddings").iterdir()) == embeddings
    assert sorted(p.name.split("-")[0] for p in staged.iterdir()) == ["reference", "source"]
    translation.unlink()
    card.unlink()


def test_the_demo_card_is_square_and_shows_all_three_images():
    from PIL import Image as PILImage

    tiles = [("source", np.full((16, 16, 3), 200, np.uint8)), ("reference", np.zeros((16, 16, 3), np.uint8))]
    card = rw.showing.card(tiles, ("VCT translation", np.full((16, 16, 3), 90, np.uint8)))
    assert isinstance(card, PILImage.Image) and card.size == (512, 512)
    colours = {c for _, c in card.getcolors(1 << 16)}
    assert {(200, 200, 200), (0, 0, 0), (90, 90, 90)} <= colours


@pytest.mark.parametrize("argv, message", [
    (["--demo", "--workflow", "style_transfer"], "--demo brings its own workflow, model and images: drop --workflow"),
    (["--source", "a.png"], "required: --workflow, --reference (or --demo)"),
])
def test_demo_arguments_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        rw.main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
