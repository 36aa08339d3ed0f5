"""Saved inversions: a file written by VCT Save Inversion loads back, refused for another model or image;
the node logs the path and shows the name; VCT Load Inversion lists files as ComfyUI's own loaders do."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from support import comfy_runner, comfy_tiny


def test_saved_inversion_loads_back_and_refuses_another_model_or_image(pack, setup):
    import folder_paths

    model, tuned, latent = setup["model"], setup["tuned"], setup["latent"]
    pack.run("VCTSaveInversion", tuned, "vct_test")
    folder = Path(folder_paths.get_output_directory()) / "vct_inversions"
    files = sorted(folder.glob("vct_test_*.safetensors"))
    try:
        assert files
        (loaded,) = pack.run("VCTLoadInversion", model, latent, files[-1].name)
        torch.testing.assert_close(loaded.trajectory, tuned.trajectory)
        torch.testing.assert_close(loaded.null_embeddings, tuned.null_embeddings)
        with pytest.raises(ValueError, match="another model"):
            pack.run("VCTLoadInversion", comfy_tiny.tiny_sd15_model(seed=7), latent, files[-1].name)
        with pytest.raises(ValueError, match="latent"):
            pack.run("VCTLoadInversion", model, {"samples": torch.zeros(1, 4, 16, 16)}, files[-1].name)
        with pytest.raises(ValueError, match="another source image"):
            pack.run("VCTLoadInversion", model, {"samples": torch.zeros(1, 4, 8, 8)}, files[-1].name)
    finally:
        for f in files:
            f.unlink()


def test_save_inversion_logs_the_path_and_shows_the_name(tiny_checkpoint, comfy_session, caplog):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "VCTDDIMInvert", "inputs": {"model": ["1", 0], "latent": ["2", 0],
                                                        "conditioning": ["3", 0], "steps": 2}},
        "5": {"class_type": "VCTSaveInversion", "inputs": {"inversion": ["4", 0], "filename_prefix": "ui_test"}},
    }
    with caplog.at_level(logging.INFO, logger="ComfyUI-VCT"):
        result = comfy_runner.run_prompt(prompt)
    name = result.outputs["5"]["text"][0]
    path = Path(comfy_session.output_dir) / "vct_inversions" / name
    assert path.is_file()
    assert any(str(path) in r.getMessage() for r in caplog.records)
    assert ("5", f"saved vct_inversions/{name}") in result.server.progress_text
    path.unlink()


def test_load_inversion_list_refreshes_like_comfyuis_own_loaders(vct_pack, comfy_session):
    # ComfyUI's loaders list files in a plain combo that every node-definitions request (the
    # frontend's Refresh, R) builds again. Not a remote list: frontend 1.27 sets a remote list to
    # its first entry when it loads, which would drop a saved workflow's choice.
    def listed():
        spec = comfy_runner.node_info("VCTLoadInversion")["input"]["required"]["inversion_file"]
        assert "remote" not in spec[1]
        return spec[1]["options"]

    folder = Path(comfy_session.output_dir) / "vct_inversions"
    folder.mkdir(parents=True, exist_ok=True)
    assert "listed_00001.safetensors" not in listed()
    (folder / "listed_00001.safetensors").write_bytes(b"")
    try:
        assert "listed_00001.safetensors" in listed()
    finally:
        (folder / "listed_00001.safetensors").unlink()
    assert "listed_00001.safetensors" not in listed()
