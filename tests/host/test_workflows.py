"""The shipped workflows, and a cancelled run, through ComfyUI's own executor on tiny checkpoints: each on the
tiny family standing in for the checkpoint it loads (SD1.5 for the UNet templates, SD3 and Flux for theirs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import comfy_runner, comfy_tiny_checkpoint

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))


def workflow_family(path: Path) -> str:
    """Return the tiny family ("sd15", "sd3", "flux", ...) that stands in for the checkpoint the template loads."""
    (name,) = {n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"]
               if n["type"] == "CheckpointLoaderSimple"}
    return comfy_tiny_checkpoint.checkpoint_family(name)


FAMILIES = {w: workflow_family(w) for w in WORKFLOWS}
# The templates made for SD1.5 (UNet): test_families.py runs them on SD2.x and SDXL too.
UNET_WORKFLOWS = [w for w in WORKFLOWS if FAMILIES[w] == "sd15"]


def small_workflow(path: Path, embedding_name: str = "") -> dict:
    """Return the template's API prompt at 32x32 px (a 4x4 latent) with a few steps per node."""
    prompt = comfy_runner.api_prompt_from_file(path)
    comfy_runner.set_inputs(prompt, "ImageScale", width=32, height=32)
    comfy_runner.set_inputs(prompt, "VCTDDIMInvert", steps=4)
    if any(n["class_type"] == "VCTNullTextInvert" for n in prompt.values()):  # Flux's template has none
        comfy_runner.set_inputs(prompt, "VCTNullTextInvert", inner_steps=3)
    comfy_runner.set_inputs(prompt, "VCTConceptLearn", steps=3, grad_accum=2, embedding_name=embedding_name)
    return prompt


def test_each_template_runs_on_the_family_of_its_checkpoint():
    assert {w.stem: f for w, f in FAMILIES.items()} == {
        "VCT subject translation": "sd15", "VCT style transfer": "sd15", "VCT + ControlNet": "sd15",
        "VCT fast translation": "sd15", "VCT SD3.5 subject translation": "sd3",
        "VCT Flux.1 subject translation": "flux"}


@pytest.mark.parametrize("workflow", [w for w in WORKFLOWS if FAMILIES[w] != "sd15"], ids=lambda w: w.stem)
def test_flow_templates_follow_their_familys_recipe(workflow, vct_pack):
    prompt = comfy_runner.api_prompt_from_file(workflow)
    by_class = {}
    for node_id, node in prompt.items():
        by_class.setdefault(node["class_type"], []).append(node_id)
    (sampler,) = (prompt[k]["inputs"] for k in by_class["VCTDualBranchSampler"])
    (invert,) = (prompt[k]["inputs"] for k in by_class["VCTDDIMInvert"])
    assert {prompt[k]["inputs"]["width"] for k in by_class["ImageScale"]} == {1024}, "both families work at 1024 px"
    if FAMILIES[workflow] == "sd3":
        # SD3 runs CFG: the sampler takes the null-text inversion tuned for its own cfg.
        (null_text,) = by_class["VCTNullTextInvert"]
        assert sampler["inversion"][0] == null_text and prompt[null_text]["inputs"]["cfg"] == sampler["cfg"] == 5.0
        assert invert["steps"] == 50 and "FluxGuidance" not in by_class
    else:
        # Flux is guidance-distilled: no null-text step, and both prompts carry the same FluxGuidance.
        assert "VCTNullTextInvert" not in by_class and sampler["inversion"][0] == by_class["VCTDDIMInvert"][0]
        assert invert["steps"] == 28
        guided = [prompt[invert["conditioning"][0]], prompt[sampler["concept"][0]]]
        assert [g["class_type"] for g in guided] == ["FluxGuidance"] * 2
        assert [g["inputs"]["guidance"] for g in guided] == [3.5, 3.5]
        assert prompt[guided[1]["inputs"]["conditioning"][0]]["class_type"] == "VCTConceptLearn"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflow_validates_and_runs_to_a_saved_image(workflow, vct_pack, tiny_checkpoint, input_image):
    prompt = small_workflow(workflow)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            tiny_checkpoint.add(node["inputs"]["ckpt_name"], family=FAMILIES[workflow])
        if node["class_type"] == "LoadImage":
            input_image(node["inputs"]["image"], width=40, height=48)
        if node["class_type"] == "ControlNetLoader":
            tiny_checkpoint.add_controlnet(node["inputs"]["control_net_name"])
    result = comfy_runner.run_prompt(prompt)
    assert result.success
    saved = [p for nid, n in prompt.items() if n["class_type"] == "SaveImage" for p in result.output_files(nid)]
    assert saved and all(p.is_file() and p.suffix == ".png" for p in saved)
    assert [c["family"] for c in tiny_checkpoint.calls] == [FAMILIES[workflow]]


def test_interrupting_concept_learning_leaves_no_file_and_a_usable_model(vct_pack, tiny_checkpoint, input_image,
                                                                        comfy_session):
    name = tiny_checkpoint.name
    input_image("reference.png")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "VCTConceptLearn", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "latent": ["3", 0], "initializer": "dog", "num_vectors": 2,
            "steps": 40, "learning_rate": 5e-4, "grad_accum": 1, "l1_weight": 1.0, "seed": 0,
            "embedding_name": "vct_interrupted", "overwrite": False}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}},
    }
    folder = comfy_session.folder("embeddings")
    before = set(folder.iterdir())
    result = comfy_runner.run_prompt(prompt, interrupt_at_progress=5)
    assert result.interrupted and not result.success
    assert set(folder.iterdir()) == before, "an interrupted run writes nothing"
    prompt["4"]["inputs"]["steps"] = 2
    again = comfy_runner.run_prompt(prompt)
    try:
        assert again.success and (folder / "vct_interrupted.safetensors").is_file()
    finally:
        (folder / "vct_interrupted.safetensors").unlink(missing_ok=True)
