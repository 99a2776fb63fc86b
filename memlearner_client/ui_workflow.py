"""A UI-format ComfyUI workflow (what the frontend saves, ``example_workflows/*.json``) as an API-format graph,
using the server's ``/object_info`` for each node's input order, as the frontend's "Save (API)" does.

Each node's ``widgets_values`` are matched to its widget inputs in the server's order (a V3 dynamic combo's value
is followed by those of its chosen option's inputs, sent as ``combo.input``; the control value the
frontend keeps after a seed, "fixed" / "randomize"..., is skipped; an input added to the node after the file was
saved is left out, for the server's default, as the frontend does), links are resolved through Reroute nodes,
bypassed nodes (to their input of the same type) and PrimitiveNodes (their value), notes are dropped, and so are
muted nodes and the inputs linked to them. Subgraphs are not converted: ``Fail`` with the fix.
"""

from __future__ import annotations

from .errors import Fail

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
NOTES = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4
EXPORT_FIX = "export it from ComfyUI with 'Save (API)' (or use the shipped workflows/api/ file)"


def is_ui_format(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _link_table(ui: dict, path: str) -> dict[int, tuple[int, int, str | None]]:
    """link id -> (origin node id, origin slot, type); links are lists (version 0.4) or objects (version 1)."""
    table = {}
    for link in ui.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            table[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else None)
        elif isinstance(link, dict) and {"id", "origin_id", "origin_slot"} <= set(link):
            table[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type"))
        else:
            raise Fail(f"{path}: a link of this UI-format workflow is not understood; {EXPORT_FIX}", 2)
    return table


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # a V3 combo whose chosen option brings inputs of its own (ComfyUI 0.30+)


def input_specs(info: dict, chosen=lambda key, default: default):
    """``(key, type, options)`` of a node's inputs in the frontend's widget order: required, then optional, each in
    the server's ``input_order``; a V1 list of choices is a COMBO. A dynamic combo is a COMBO of its option keys,
    followed at once by the inputs of the option ``chosen(key, first_option)`` names, keyed ``combo.input`` (the
    API keys ComfyUI 0.3x and its frontend use), recursively. Lazy: ``chosen`` is asked only when the walk reaches
    the combo, so a caller reading values in order can answer from what it has read."""
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        specs = (info.get("input") or {}).get(section) or {}
        yield from _section_specs(specs, order.get(section) or list(specs), "", chosen)


def _section_specs(specs: dict, names, prefix: str, chosen):
    for name in names:
        spec = specs.get(name) or ["*"]
        opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
        key = prefix + name
        if isinstance(spec[0], list):
            opts["options"] = spec[0]
            yield key, "COMBO", opts
        elif spec[0] == DYNAMIC_COMBO:
            options = [o for o in opts.get("options") or [] if isinstance(o, dict)]
            keys = [o.get("key") for o in options]
            yield key, "COMBO", {**opts, "options": keys}
            pick = chosen(key, keys[0] if keys else None)
            inner = next((o.get("inputs") or {} for o in options if o.get("key") == pick), {})
            for sub in ("required", "optional"):
                yield from _section_specs(inner.get(sub) or {}, list(inner.get(sub) or {}), key + ".", chosen)
        else:
            yield key, str(spec[0]), opts


def to_api(ui: dict, object_info: dict, path: str = "workflow") -> dict:
    """The API-format graph of a UI-format workflow (node ids as strings, titles as ``_meta.title``)."""
    nodes = {n.get("id"): n for n in ui["nodes"] if isinstance(n, dict)}
    links = _link_table(ui, path)
    subgraphs = {s.get("id") for s in (ui.get("definitions") or {}).get("subgraphs") or [] if isinstance(s, dict)}
    real = {i: n for i, n in nodes.items() if n.get("type") not in NOTES | {"Reroute", "PrimitiveNode"}
            and n.get("mode", 0) not in (MUTED, BYPASSED)}
    if any(n.get("type") in subgraphs for n in real.values()):
        raise Fail(f"{path} uses subgraphs, which the client does not convert: {EXPORT_FIX}", 2)
    missing = sorted({str(n.get("type")) for n in real.values() if n.get("type") not in object_info})
    if missing:
        raise Fail(f"{path}: the server has no node type {', '.join(missing)} (a custom node not installed there?)")

    def source(link_id, seen=()):
        """``[node_id, slot]``, ``("value", v)`` for a PrimitiveNode, or None (unlinked, muted, dead end)."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        origin, slot, kind = links[link_id]
        node = nodes.get(origin)
        if node is None or node.get("mode", 0) == MUTED:
            return None
        if node.get("type") == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if node.get("type") == "Reroute" or node.get("mode", 0) == BYPASSED:
            ins = [s for s in node.get("inputs") or [] if isinstance(s, dict) and s.get("link") is not None]
            if node.get("type") != "Reroute":  # a bypassed node passes on its first input of the output's type
                ins = [s for s in ins if s.get("type") == kind][:1]
            return source(ins[0]["link"], (*seen, link_id)) if ins else None
        return [str(origin), slot]

    graph = {}
    for node_id, n in real.items():
        slots = {s.get("name"): s for s in n.get("inputs") or [] if isinstance(s, dict)}
        values = n.get("widgets_values")
        values = values if isinstance(values, (list, dict)) else []
        position, inputs = 0, {}
        for name, kind, opts in input_specs(object_info[n["type"]], inputs.get):
            if kind in WIDGET_TYPES and not opts.get("forceInput"):
                if isinstance(values, dict):
                    value = values.get(name)
                elif position < len(values):
                    value, position = values[position], position + 1
                    control = opts.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed"))
                    if control and position < len(values) and values[position] in CONTROL_VALUES:
                        position += 1
                else:  # saved before the node had this input: left to the server's default, as the frontend does
                    value = None
                if value is not None:
                    inputs[name] = value
            link = source((slots.get(name) or {}).get("link"))
            if isinstance(link, tuple):
                inputs[name] = link[1]
            elif link is not None:
                inputs[name] = link
        api = {"inputs": inputs, "class_type": n["type"]}
        if n.get("title"):
            api["_meta"] = {"title": n["title"]}
        graph[str(node_id)] = api
    return graph
