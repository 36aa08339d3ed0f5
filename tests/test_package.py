"""Layering rules: the kernel layer is host-agnostic and the pack imports without ComfyUI."""
import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {"torch", "__future__", "typing", "dataclasses", "math", "collections", "functools", "itertools"}


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_kernel_layer_imports_torch_and_the_standard_library_only():
    files = sorted((ROOT / "vct_ops").glob("*.py"))
    assert files
    for path in files:
        outside = set(imported_modules(path)) - ALLOWED
        assert not outside, f"{path.name} imports {sorted(outside)}"


def load_pack_like_comfyui(name="ComfyUI-VCT"):
    # ComfyUI imports a custom node folder as a package named after the folder.
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def test_pack_imports_cleanly_without_comfyui():
    if importlib.util.find_spec("comfy_api") is not None:
        pytest.skip("ComfyUI is importable here; the host tier covers registration")
    module = load_pack_like_comfyui()
    assert module.__all__ == []
    assert not hasattr(module, "comfy_entrypoint")


def test_nodes_folder_is_not_a_top_level_package(tmp_path):
    # Asked of the installed environment from a neutral folder, not of this test process (whose
    # sys.path depends on how pytest was started): our nodes/ must never shadow ComfyUI's `nodes`.
    probe = "import importlib.util as u; s = u.find_spec('nodes'); print(s.origin if s else '')"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = found.stdout.strip()
    assert not origin or ROOT not in pathlib.Path(origin).resolve().parents, origin


def relative_imports(path, package_parts):
    """Yield the dotted names (relative to the pack root) of the modules `path` imports relatively."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package_parts[: len(package_parts) - node.level + 1]
            module = base + (node.module.split(".") if node.module else [])
            if node.module:
                yield ".".join(module)
            yield from (".".join(module + [alias.name]) for alias in node.names)


def nodes_import_graph():
    """Return {module: set of nodes/ modules it imports}, module names dotted from the pack root."""
    graph = {}
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        graph[name] = set()
        for target in relative_imports(path, package):
            # `from .x import y` names module x and, when it is a module, y; keep what exists as a module.
            file = ROOT.joinpath(*target.split("."))
            if target.startswith("nodes") and target != name and (file.with_suffix(".py").is_file() or file.is_dir()):
                graph[name].add(target)
    return graph


def test_nodes_modules_import_no_circle():
    graph = nodes_import_graph()
    assert "nodes.model.training" in graph and "nodes.arch" in graph

    def reaches(start, goal, seen):
        for nxt in graph.get(start, ()):
            if nxt == goal:
                return True
            # A module importing its own package's __init__ is how Python loads it, not a circle.
            if nxt not in seen and not goal.startswith(nxt + "."):
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    circles = [m for m in graph if reaches(m, m, set())]
    assert not circles, f"import circles through {circles}"


def test_nodes_files_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "nodes").rglob("*.py")}
    assert sizes and max(sizes.values()) <= 300, {k: v for k, v in sizes.items() if v > 300}


ARCHITECTURE_MODULES = ("comfy.ldm", "comfy.supported_models", "comfy.sd1_clip", "comfy.clip_model", "comfy.sdxl_clip",
                        "comfy.text_encoders")


def test_only_the_architecture_seam_knows_network_internals():
    # Everything that depends on the network's architecture sits behind nodes/arch: a new family is one
    # more implementation there, and no other nodes/ module imports a network's or text encoder's code.
    outside = {}
    for path in (ROOT / "nodes").rglob("*.py"):
        if "arch" in path.relative_to(ROOT / "nodes").parts:
            continue
        tree = ast.parse(path.read_text())
        names = [alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module]
        found = [m for m in names if m.startswith(ARCHITECTURE_MODULES)]
        if found:
            outside[str(path.relative_to(ROOT))] = found
    assert not outside, outside
