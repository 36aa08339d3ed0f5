"""UI-format workflow (what the ComfyUI frontend saves) -> API prompt (what ComfyUI's executor runs).

Widget order comes from each node's own schema (`INPUT_TYPES`, or a V3 node's schema), links are
resolved through Reroute and PrimitiveNode, and notes, muted and bypassed nodes are handled as the
frontend does. Needs a bootstrapped ComfyUI (it reads `nodes.NODE_CLASS_MAPPINGS`); imports
nothing from ComfyUI at import time. A module of the headless runner (run_workflow.py), not a command.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload")
MODE_MUTED, MODE_BYPASS = 2, 4


def node_info(class_type: str) -> dict:
    """Return what /object_info gives the frontend for a node (V1 or V3): `input` and `input_order`."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v.keys()) for k, v in inputs.items()}}


def display_name(class_type: str) -> str:
    """Return the name the frontend gives a node of this class: its display name, else the class name."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 nodes, as /object_info describes them
        return cls.GET_NODE_INFO_V1().get("display_name") or class_type
    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type) or class_type


def widget_layout(class_type: str) -> list[dict]:
    """Return a node's widgets in `widgets_values` order: name, spec, default, and the frontend-only values
    saved after it: `control` (INT with control_after_generate, or seed/noise_seed), `upload` (upload combos)."""
    info, out = node_info(class_type), []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {}) or {}
        for name in info["input_order"].get(section, list(specs.keys())):
            spec = specs[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not (isinstance(spec[0], (list, tuple)) or (spec[0] in WIDGET_TYPES and not opts.get("forceInput"))):
                continue  # a socket, not a widget (V1 combos are option lists)
            control = spec[0] == "INT" and bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))
            out.append({"name": name, "spec": spec, "control": control, "default": opts.get("default"),
                        "upload": any(opts.get(f) for f in UPLOAD_FLAGS)})
    return out


def _assign_widget_values(class_type: str, values) -> dict:
    """Return {input name: value} for a node's saved `widgets_values` (list or dict)."""
    layout = widget_layout(class_type)
    if isinstance(values, dict):  # some nodes save {name: value}
        return {w["name"]: values[w["name"]] for w in layout if w["name"] in values}
    values = list(values or [])
    base, n_ctrl, n_upl = len(layout), sum(w["control"] for w in layout), sum(w["upload"] for w in layout)
    use_ctrl = use_upl = True
    for c, u in ((True, True), (True, False), (False, True), (False, False)):
        if base + n_ctrl * c + n_upl * u == len(values):
            use_ctrl, use_upl = c, u
            break
    else:
        if len(values) < base + n_ctrl + n_upl:  # too few: an older save; the rest gets defaults
            use_ctrl = use_upl = len(values) > base
    out, i = {}, 0
    for w in layout:
        if i < len(values):
            out[w["name"]] = values[i]
        elif w["default"] is not None:
            out[w["name"]] = w["default"]
        i += 1 + int(w["control"] and use_ctrl) + int(w["upload"] and use_upl)
    return out


def ui_to_api(workflow: dict, *, keep_bypassed: bool = False) -> dict:
    """Return the API prompt {id: {"class_type", "inputs", "_meta"}} of a UI-format (frontend-saved) workflow.

    Widget values are matched by `widget_layout`; a linked input becomes [origin_id, slot]; links are followed
    through Reroutes and bypassed nodes (mode 4: to the first input of the output's type, preferring the same
    index); a PrimitiveNode's value is inlined; Notes and muted nodes (mode 2) are dropped. No subgraphs."""
    import nodes

    subgraph_ids = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    wf_nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        lid, o_id, o_slot = (link["id"], link["origin_id"], link["origin_slot"]) if isinstance(link, dict) else link[:3]
        links[lid] = (str(o_id), int(o_slot))

    def resolve(link_id, depth=0):
        """Return ("link", [node_id, slot]), ("value", v) or None for a link, followed upstream."""
        if link_id not in links or depth > 64 or links[link_id][0] not in wf_nodes:
            return None
        o_id, o_slot = links[link_id]
        src, mode = wf_nodes[o_id], wf_nodes[o_id].get("mode", 0)
        if src["type"] == "Reroute":
            return resolve((src.get("inputs") or [{}])[0].get("link"), depth + 1)
        if src["type"] == "PrimitiveNode":
            return ("value", src["widgets_values"][0]) if src.get("widgets_values") else None
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS and not keep_bypassed:
            outs, ins = src.get("outputs") or [], src.get("inputs") or []
            out_type = outs[o_slot].get("type") if o_slot < len(outs) else None
            cands = [i for i, inp in enumerate(ins) if inp.get("type") == out_type and inp.get("link") is not None]
            return resolve(ins[o_slot if o_slot in cands else cands[0]]["link"], depth + 1) if cands else None
        return ("link", [o_id, o_slot])

    prompt = {}
    for nid, n in wf_nodes.items():
        ctype, mode = n["type"], n.get("mode", 0)
        if ctype in VIRTUAL_NODES or mode == MODE_MUTED or (mode == MODE_BYPASS and not keep_bypassed):
            continue
        if ctype in subgraph_ids:
            raise NotImplementedError(f"node {nid}: subgraphs are not supported by ui_to_api")
        if ctype not in nodes.NODE_CLASS_MAPPINGS:
            raise KeyError(f"node {nid}: unknown node type {ctype!r} (pack not loaded?)")
        inputs = _assign_widget_values(ctype, n.get("widgets_values"))
        for inp in n.get("inputs") or []:
            r = resolve(inp.get("link"))
            if r is not None:  # unresolvable (muted source...): a socket stays unset, a widget keeps its value
                inputs[inp["name"]] = r[1]
        # the frontend's `_meta.title` is the node's title, which is its display name until the user renames it
        prompt[nid] = {"class_type": ctype, "inputs": inputs, "_meta": {"title": n.get("title") or display_name(ctype)}}
    return prompt


def _matching(prompt: dict, node: str) -> list[str]:
    """Return [node] if it is a node id of the prompt, else the ids of all nodes of class `node`."""
    return [node] if node in prompt else [k for k, v in prompt.items() if v["class_type"] == node]


def set_inputs(prompt: dict, node: str, **values) -> list[str]:
    """Set inputs on node id `node` or every node of class `node`; return the ids changed (KeyError if none)."""
    ids = _matching(prompt, node)
    if not ids:
        raise KeyError(f"no node {node!r} in the prompt")
    for k in ids:
        prompt[k]["inputs"].update(values)
    return ids


def load_workflow(path) -> dict:
    """Return a workflow file's JSON."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def api_prompt_from_file(path, **kwargs) -> dict:
    """Return a workflow file as an API prompt (UI format converted, API format as is)."""
    wf = load_workflow(path)
    return ui_to_api(wf, **kwargs) if isinstance(wf.get("nodes"), list) else wf


if __name__ == "__main__":
    sys.exit(f"{Path(__file__).name} is a module of the headless runner, not a command: "
             f"see python {Path(__file__).with_name('run_workflow.py')} --help")
