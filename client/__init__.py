"""A small headless ComfyUI client: run an API-format workflow on any ComfyUI server.

    from client import run_workflow
    result = run_workflow("http://127.0.0.1:8188", "flux.api.json",
                          overrides=["LoRA.lora_name=style.safetensors", "KSampler.seed=42"],
                          out_dir="outputs", timeout=600, progress=print)
    result.prompt_id, result.outputs, result.node_outputs

It speaks only ComfyUI's standard HTTP and websocket API (POST /prompt, /ws?clientId=,
GET /history/<id>, /view, POST /queue and /interrupt to cancel its own prompt on a timeout)
and uses the Python standard library alone: no ComfyUI, torch or third-party import, so it runs
on a laptop against a remote server. Command line: `python -m client --help` (or `quantlora-run`).
"""
from __future__ import annotations

# One job per module: errors, workflow (files, overrides, node names), server (HTTP), websocket,
# messages (the server's errors for a person), outputs (downloads), progress, run (run_workflow).
from .errors import ClientError, ExecutionError, RunTimeout, ServerError, ValidationError, WorkflowError
from .messages import _format_execution_error, _format_validation, _message
from .outputs import _safe_relpath, _unique, download_outputs, output_files
from .progress import Progress
from .run import RunResult, _cancel, _history_entry, _wait, run_workflow
from .server import _Http
from .websocket import _WebSocket, _WebSocketClosed
from .workflow import (_api_twin, _is_api_graph, _is_ui_graph, _parse_value, _read_json, _resolve_node,
                       _split_override, apply_overrides, describe_nodes, load_workflow, node_label, node_title)

__all__ = ["run_workflow", "load_workflow", "apply_overrides", "RunResult", "Progress", "ClientError",
           "WorkflowError", "ServerError", "ValidationError", "ExecutionError", "RunTimeout"]
