"""The pack's registry metadata as ComfyUI itself reads it: `comfy_config.config_parser`, the parser
ComfyUI runs on every custom node's pyproject.toml while loading it (the registry tooling shares its types)."""
from __future__ import annotations

from pathlib import Path

import pytest
from comfy_config import config_parser

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")

ROOT = Path(__file__).resolve().parents[2]


def test_comfyui_parses_the_pack_metadata(vct_pack):
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config = config_parser.extract_node_configuration(str(vct_pack.path))
    project, comfy = config.project, config.tool_comfy
    assert project.name == raw["project"]["name"] and project.version == raw["project"]["version"]
    assert project.license.text == "GPL-3.0-only"
    assert project.urls.repository == raw["project"]["urls"]["Repository"]
    assert project.urls.issues == raw["project"]["urls"]["Issues"]
    assert comfy.publisher_id == raw["tool"]["comfy"]["PublisherId"]
    assert comfy.display_name == raw["tool"]["comfy"]["DisplayName"]
    assert comfy.icon == raw["tool"]["comfy"]["Icon"] and comfy.icon.startswith("https://")
    assert project.supported_comfyui_version == raw["tool"]["comfy"]["requires-comfyui"]
    # Loading the pack ran the same parser; a file it cannot read is only a warning in ComfyUI's log.
    assert "Unable to parse pyproject.toml" not in vct_pack.log
