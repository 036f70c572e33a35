"""The server's error answers (validation at POST /prompt, execution errors) as lines for a person."""
from __future__ import annotations

import re
from typing import Any

from .workflow import node_label


def _message(e: dict) -> str:
    """An error entry's message with its details, the details only where they add something."""
    msg = str(e.get("message") or e.get("type") or "error")
    details = e.get("details")
    if details and str(details) not in msg:
        msg += f": {details}"
    return msg


def _format_validation(body: Any, graph: dict) -> str:
    """The server's 400 answer to POST /prompt as lines for a person. Handles ComfyUI 0.3.75's and
    v0.33's shapes: a top-level "error" (a dict, or a string from old servers) that v0.33 ties to a
    node through extra_info.node_id (e.g. an unknown class_type: "missing_node_type"; 0.3.75 said
    "invalid_prompt" and named the node only in its details), plus per-node "node_errors"."""
    if not isinstance(body, dict):
        return f"the server rejected the prompt: {body}"
    err = body.get("error")
    if isinstance(err, dict):
        head = _message(err) if (err.get("message") or err.get("type")) else "invalid prompt"
        extra = err.get("extra_info") if isinstance(err.get("extra_info"), dict) else {}
        if extra.get("node_id") is not None and not body.get("node_errors"):
            head = f"{node_label(graph, extra['node_id'], extra.get('class_type'))}: {head}"
    else:
        head = str(err or "invalid prompt")
    lines = [f"the server rejected the prompt: {head}"]
    node_errors = body.get("node_errors")
    for nid, info in (node_errors.items() if isinstance(node_errors, dict) else ()):
        info = info if isinstance(info, dict) else {"errors": [{"message": str(info)}]}
        label = node_label(graph, nid, info.get("class_type"))
        for e in info.get("errors") or []:
            lines.append(f"  {label}: {_message(e) if isinstance(e, dict) else e}")
    return "\n".join(lines)


def _format_execution_error(data: dict, graph: dict) -> str:
    nid = data.get("node_id")
    where = f" in {node_label(graph, nid, data.get('node_type'))}" if nid is not None else ""
    # a custom node's exception type carries its module path (".../custom_nodes/Pack.errors.X"): keep the tail
    etype = re.split(r"[\\/]", data.get("exception_type") or "error")[-1]
    return f"execution failed{where}: {etype}: {data.get('exception_message', '').strip()}"
