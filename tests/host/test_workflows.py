"""The shipped workflows, and a cancelled run, through ComfyUI's own executor on tiny checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
from support import comfy_runner

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))


def small_workflow(path: Path, embedding_name: str = "") -> dict:
    prompt = comfy_runner.api_prompt_from_file(path)
    comfy_runner.set_inputs(prompt, "ImageScale", width=32, height=32)
    comfy_runner.set_inputs(prompt, "VCTDDIMInvert", steps=4)
    comfy_runner.set_inputs(prompt, "VCTNullTextInvert", inner_steps=3)
    comfy_runner.set_inputs(prompt, "VCTConceptLearn", steps=3, grad_accum=2, embedding_name=embedding_name)
    return prompt


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflow_validates_and_runs_to_a_saved_image(workflow, vct_pack, tiny_checkpoint, input_image):
    prompt = small_workflow(workflow)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            tiny_checkpoint.add(node["inputs"]["ckpt_name"])
        if node["class_type"] == "LoadImage":
            input_image(node["inputs"]["image"], width=40, height=48)
        if node["class_type"] == "ControlNetLoader":
            tiny_checkpoint.add_controlnet(node["inputs"]["control_net_name"])
    result = comfy_runner.run_prompt(prompt)
    assert result.success
    saved = [p for nid, n in prompt.items() if n["class_type"] == "SaveImage" for p in result.output_files(nid)]
    assert saved and all(p.is_file() and p.suffix == ".png" for p in saved)


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
