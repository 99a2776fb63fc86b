"""API-format graph -> ComfyUI UI-format workflow (what the frontend saves and loads by drag and drop).

Widget values follow each node's input order from ComfyUI's ``/object_info`` (a seed with
``control_after_generate`` gets its "fixed" control value after it; a V3 dynamic combo's value is followed by those
of its chosen option's inputs, as the frontend saves them), links become the ``links`` table, and
nodes are laid out in columns by their distance from the loaders, with notes in the first column.
"""

from __future__ import annotations

from memlearner_client.ui_workflow import WIDGET_TYPES, input_specs

COLUMN, NODE_WIDTH, ROW, GAP = 380, 320, 26, 40


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def default_value(kind: str, opts: dict):
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        return (opts.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def columns(graph: dict) -> dict[str, int]:
    """Each node's column: the longest chain of links from a node with no linked inputs."""
    depth: dict[str, int] = {}

    def visit(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in graph[nid]["inputs"].values() if is_link(v)]
            depth[nid] = 1 + max((visit(u) for u in ups), default=-1)
        return depth[nid]

    for nid in graph:
        visit(nid)
    return depth


def to_ui(graph: dict, object_info: dict, notes: list[str] = ()) -> dict:
    """The UI-format workflow of ``graph`` (node ids become 1..N in the graph's order)."""
    ids = {nid: i + 1 for i, nid in enumerate(graph)}
    col = columns(graph)
    nodes, links, heights = [], [], {}
    outputs: dict[str, list[dict]] = {}
    for nid, n in graph.items():
        info = object_info[n["class_type"]]
        outputs[nid] = [{"name": name, "type": kind, "links": [], "slot_index": i}
                        for i, (kind, name) in enumerate(zip(info["output"], info["output_name"], strict=True))]
    for nid, n in graph.items():
        info = object_info[n["class_type"]]
        inputs, widgets = [], []
        given = {k: v for k, v in n["inputs"].items() if not is_link(v)}
        for name, kind, opts in input_specs(info, given.get):
            value = n["inputs"].get(name)
            entry = {"name": name, "type": kind, "link": None}
            if kind in WIDGET_TYPES:
                widgets.append(value if value is not None and not is_link(value) else default_value(kind, opts))
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
                if not is_link(value):
                    continue  # a plain widget: no input slot
                entry["widget"] = {"name": name}
            if is_link(value):
                src, slot = value
                entry["link"] = len(links) + 1
                links.append([entry["link"], ids[src], slot, ids[nid], len(inputs), outputs[src][slot]["type"]])
                outputs[src][slot]["links"].append(entry["link"])
            inputs.append(entry)
        height = 46 + ROW * (len(widgets) + max(len(inputs), len(outputs[nid])))
        heights[nid] = height
        ui = {"id": ids[nid], "type": n["class_type"], "pos": [0, 0], "size": [NODE_WIDTH, height], "flags": {},
              "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs[nid],
              "properties": {"Node name for S&R": n["class_type"]}, "widgets_values": widgets}
        if "_meta" in n and n["_meta"].get("title"):
            ui["title"] = n["_meta"]["title"]
        nodes.append(ui)
    lay_out(nodes, graph, col, heights)
    next_id = len(nodes) + 1
    y = 40
    for text in notes:
        height = 40 + 20 * (text.count("\n") + 1)
        nodes.append({"id": next_id, "type": "Note", "pos": [40 - COLUMN, y], "size": [NODE_WIDTH + 20, height],
                      "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                      "properties": {"text": ""}, "widgets_values": [text], "title": "Read me",
                      "color": "#432", "bgcolor": "#653"})
        next_id, y = next_id + 1, y + height + GAP
    for order, ui in enumerate(sorted(nodes, key=lambda u: (u["pos"][0], u["id"]))):
        ui["order"] = order
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [COLUMN + 40, 40]}}, "version": 0.4}


def lay_out(nodes: list[dict], graph: dict, col: dict[str, int], heights: dict[str, int]) -> None:
    """Columns left to right by depth; nodes stacked top to bottom in graph order within a column."""
    y_next: dict[int, int] = {}
    for ui, nid in zip(nodes, graph, strict=False):
        c = col[nid]
        y = y_next.get(c, 40)
        ui["pos"] = [40 + c * COLUMN, y]
        y_next[c] = y + heights[nid] + GAP
