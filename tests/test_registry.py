"""Comfy Registry readiness: pyproject's metadata, the license, the icon, and what an archive leaves out.

The registry's rules are those of its pyproject specification (docs.comfy.org/registry/specifications);
the host tier also reads the file back through ComfyUI's own parser (tests/host/test_metadata.py).
"""
import ast
import re
import struct
from pathlib import Path
from urllib.parse import urlparse

import pytest

# The standard library reads TOML from Python 3.11 on; CI runs 3.11.
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]


def github_repository(url: str) -> tuple[str, str]:
    """Return (owner, name) of a https://github.com/<owner>/<name> address, failing on anything else."""
    parsed = urlparse(url)
    parts = parsed.path.strip("/").split("/")
    assert parsed.scheme == "https" and parsed.netloc == "github.com" and len(parts) == 2 and all(parts), url
    return parts[0], parts[1]


def png_size(path: Path) -> tuple[int, int]:
    """Return (width, height) from a PNG file's header, failing if it is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_node_id_and_version_follow_the_registry_rules():
    name = PROJECT["name"]
    # Letters, digits and single - _ . between them; under 100 characters; no "ComfyUI" in it.
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name) and len(name) < 100, name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]
    assert PROJECT["description"].strip()
    assert COMFY["PublisherId"].strip() and COMFY["DisplayName"].strip()
    assert COMFY["requires-comfyui"].startswith(">=")


def test_license_is_declared_and_shipped():
    # An SPDX expression (PEP 639), which both setuptools >= 77 and the registry's parsers accept.
    assert PROJECT["license"] == "GPL-3.0-only"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text[:200] and "Version 3, 29 June 2007" in text[:200]
    requires = PYPROJECT["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires), requires


def test_repository_is_a_github_address_that_icon_and_readme_follow():
    repository = PROJECT["urls"]["Repository"]
    owner, name = github_repository(repository)
    assert PROJECT["urls"]["Issues"] == f"{repository}/issues"
    # The icon is a file of this repository, served raw from its main branch.
    prefix = f"https://raw.githubusercontent.com/{owner}/{name}/main/"
    assert COMFY["Icon"].startswith(prefix), COMFY["Icon"]
    icon = ROOT / COMFY["Icon"].removeprefix(prefix)
    assert icon.is_file(), f"the Icon points at {icon.relative_to(ROOT)}, which is not in the repository"
    # The registry shows icons square, at most 400 px.
    width, height = png_size(icon)
    assert width == height and 64 <= width <= 400, (width, height)
    # The README's install line clones this address into the folder name the docs use.
    assert f"git clone {repository} " in (ROOT / "README.md").read_text()
    assert name == "ComfyUI-VCT"


def comfyignore_folders() -> list[str]:
    """Return the folders .comfyignore leaves out of a registry archive, as repository-relative names."""
    lines = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    # Only anchored folder patterns ("/name/"), whose gitwildmatch meaning is simply "this folder".
    assert all(re.fullmatch(r"/[A-Za-z0-9_.-]+/", p) for p in patterns), patterns
    return [p.strip("/") for p in patterns]


def test_registry_archive_leaves_out_only_what_users_do_not_run():
    ignored = comfyignore_folders()
    assert set(ignored) == {"tests", ".ci"}
    kept = ["__init__.py", "nodes", "vct_ops", "tools", "example_workflows", "docs", "LICENSE", "README.md"]
    assert not {Path(k).parts[0] for k in kept} & set(ignored)
    # Nothing that ships imports from a folder the archive leaves out.
    shipped = [ROOT / "__init__.py", *(ROOT / "nodes").glob("*.py"), *(ROOT / "vct_ops").glob("*.py"),
               *(ROOT / "tools").glob("*.py")]
    for path in shipped:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for module in names:
                assert module.split(".")[0] not in ignored, f"{path.relative_to(ROOT)} imports {module}"
