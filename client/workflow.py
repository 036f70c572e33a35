"""Workflow files: loading API-format graphs (a UI-format file gives way to its API twin), node
names for messages, and the `NODE.input=value` overrides."""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

from .errors import WorkflowError


def _is_api_graph(g: Any) -> bool:
    return (isinstance(g, dict) and bool(g)
            and all(isinstance(v, dict) and "class_type" in v and isinstance(v.get("inputs", {}), dict)
                    for v in g.values()))


def _is_ui_graph(g: Any) -> bool:
    return isinstance(g, dict) and "nodes" in g and "links" in g


def _api_twin(path: str) -> str:
    """`<name>.api.json` next to the UI file, or in an `api/` folder beside it (the pack's own
    example_workflows keep twins there so ComfyUI's Templates list shows only the UI files)."""
    stem = path[:-5] if path.lower().endswith(".json") else path
    beside = stem + ".api.json"
    in_api = os.path.join(os.path.dirname(path), "api", os.path.basename(stem) + ".api.json")
    return in_api if not os.path.isfile(beside) and os.path.isfile(in_api) else beside


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise WorkflowError(f"{path}: cannot read the workflow file: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise WorkflowError(f"{path}: not a UTF-8 text file (byte {e.start}): expected a JSON workflow") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno} "
                            f"(char {e.pos})") from None


def load_workflow(workflow: dict | str | os.PathLike) -> tuple[dict, str | None]:
    """The API-format graph (node id -> {class_type, inputs, _meta}) and the file it came from.

    A UI-format file (with "nodes" and "links") is replaced by its API twin `<name>.api.json` next
    to it (or in `api/` beside it) when there is one; otherwise WorkflowError says to export the API format."""
    path = None
    if isinstance(workflow, (str, os.PathLike)):
        path = os.fspath(workflow)
        graph = _read_json(path)
    else:
        graph = workflow
    if isinstance(graph, dict) and _is_api_graph(graph.get("prompt")) and "class_type" not in graph:
        graph = graph["prompt"]  # a saved POST /prompt body or /history entry
    if _is_ui_graph(graph):
        if path:
            twin = _api_twin(path)
            if twin != path and os.path.isfile(twin):
                twin_graph, _ = load_workflow(twin)
                return twin_graph, twin
        where = f"{path}: " if path else ""
        raise WorkflowError(
            f"{where}this is a UI-format workflow (it has \"nodes\" and \"links\"); the client needs the API format. "
            f"In ComfyUI use Workflow > Export (API) and run that file"
            + (f" (a file named {os.path.basename(_api_twin(path))} next to it is used automatically)" if path else "")
            + ".")
    if not _is_api_graph(graph):
        where = f"{path}: " if path else ""
        raise WorkflowError(f"{where}not an API-format ComfyUI workflow: expected a JSON object of "
                            f"node id -> {{\"class_type\": ..., \"inputs\": {{...}}}} (ComfyUI's Export (API))")
    return graph, path


def node_title(graph: dict, node_id: str | None) -> str | None:
    if node_id is None:
        return None
    node = graph.get(str(node_id))
    if node is None:
        # an expanded node inside a group/subgraph: "parent.child" or "parent:child"; show the parent's title
        head = re.split(r"[.:]", str(node_id))[0]
        node = graph.get(head)
        if node is None:
            return str(node_id)
    return (node.get("_meta") or {}).get("title") or node.get("class_type") or str(node_id)


def node_label(graph: dict, node_id, class_type: str | None = None) -> str:
    """'node ID ('Title', ClassType)', or 'node ID (ClassType)' when the node has no title of its own."""
    class_type = class_type or (graph.get(str(node_id)) or {}).get("class_type")
    title = node_title(graph, node_id)
    if title in (class_type, str(node_id)) or not class_type:
        return f"node {node_id} ({class_type or title})"
    return f"node {node_id} ({title!r}, {class_type})"


def describe_nodes(graph: dict) -> str:
    lines = []
    for nid, node in graph.items():
        title = (node.get("_meta") or {}).get("title")
        lines.append(f"  {nid}: {title!r} ({node.get('class_type')})" if title else f"  {nid}: ({node.get('class_type')})")
    return "\n".join(lines)


def _resolve_node(graph: dict, ref: str) -> str | None:
    """A node id for `ref`: the id itself, else a unique title, else a unique class_type.
    None when nothing matches; WorkflowError when a title or class_type matches several nodes."""
    if ref in graph:
        return ref
    for key, label in ((lambda n: (n.get("_meta") or {}).get("title"), "title"), (lambda n: n.get("class_type"), "class_type")):
        hits = [nid for nid, n in graph.items() if key(n) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"{ref!r} matches the {label} of several nodes ({', '.join(hits)}): use a node id "
                                f"or give the nodes distinct titles.\nnodes:\n{describe_nodes(graph)}")
    return None


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split_override(item: str, graph: dict) -> tuple[str, str, str]:
    """'NODE.input=value' -> (node id, input, raw value). NODE may itself contain dots (a title)."""
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise WorkflowError(f"override {item!r}: expected NODE.input=value (NODE: a node id, title or class_type)")
    dots = [i for i, c in enumerate(key) if c == "."]
    for i in reversed(dots):  # input names have no dots: try the longest node reference first
        nid = _resolve_node(graph, key[:i].strip())
        if nid is not None:
            return nid, key[i + 1:].strip(), value
    raise WorkflowError(f"override {item!r}: no node with id, title or class_type {key[:dots[-1]].strip()!r}.\n"
                        f"nodes:\n{describe_nodes(graph)}")


def apply_overrides(graph: dict, overrides: list[str] | dict | None) -> dict:
    """A copy of `graph` with the overrides set.

    overrides: ["NODE.input=value", ...] (value parsed as JSON when it parses, else a string), or a dict
    {"NODE.input": value} / {"NODE": {"input": value}} (values used as given)."""
    graph = copy.deepcopy(graph)
    if not overrides:
        return graph
    items: list[tuple[str, str, Any]] = []
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            if isinstance(value, dict) and _resolve_node(graph, key) is not None:
                nid = _resolve_node(graph, key)
                items += [(nid, name, v) for name, v in value.items()]
            else:
                nid, name, _ = _split_override(f"{key}=", graph)
                items.append((nid, name, value))
    else:
        if isinstance(overrides, str):
            overrides = [overrides]
        for item in overrides:
            nid, name, raw = _split_override(item, graph)
            items.append((nid, name, _parse_value(raw)))
    for nid, name, value in items:
        inputs = graph[nid].setdefault("inputs", {})
        if name not in inputs:
            raise WorkflowError(f"{node_label(graph, nid)} has no input {name!r}; "
                                f"its inputs: {', '.join(inputs) or '(none)'}")
        inputs[name] = value
    return graph
