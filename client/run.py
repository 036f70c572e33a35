"""run_workflow: queue a workflow on a ComfyUI server, follow it (websocket, /history polling), cancel
it on a timeout, download its outputs."""
from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.parse
import uuid
from typing import Any, Callable

from .errors import ClientError, ExecutionError, RunTimeout, ServerError, ValidationError
from .messages import _format_execution_error, _format_validation
from .outputs import download_outputs
from .progress import Progress
from .server import _Http
from .websocket import _WebSocket, _WebSocketClosed
from .workflow import apply_overrides, load_workflow, node_label, node_title


@dataclasses.dataclass
class RunResult:
    prompt_id: str
    outputs: list  # local paths of the downloaded files
    node_outputs: dict  # /history outputs: node id -> {"images": [...], ...}
    status: dict = dataclasses.field(default_factory=dict)
    workflow_path: str | None = None  # the file actually run (an .api.json twin may replace a UI file)


def run_workflow(url: str, workflow: dict | str | os.PathLike, overrides: list[str] | dict | None = None,
                 out_dir: str | os.PathLike | None = "outputs", timeout: float = 600,
                 progress: Callable[[Progress], Any] | None = None, headers: dict | None = None,
                 client_id: str | None = None, cancel_on_timeout: bool = True) -> RunResult:
    """Runs `workflow` (an API-format dict or a file) on the ComfyUI server at `url` and waits for it.

    overrides: see apply_overrides. out_dir: where the output files are downloaded (None: no
    download). timeout: seconds for the whole run, queueing included. progress: called with a
    Progress for each event. headers: extra HTTP headers (e.g. Authorization) for every request.
    Raises WorkflowError, ValidationError (HTTP 400 from /prompt), ExecutionError, RunTimeout,
    ServerError. On a timeout or Ctrl-C the prompt is removed from the queue / interrupted."""
    graph, path = load_workflow(workflow)
    graph = apply_overrides(graph, overrides)
    deadline = time.monotonic() + timeout
    http = _Http(url, headers)
    client_id = client_id or uuid.uuid4().hex

    def emit(kind, **kw):
        if progress is not None:
            nid = kw.get("node")
            if nid is not None and "title" not in kw:
                kw["title"] = node_title(graph, nid)
                kw["class_type"] = (graph.get(str(nid)) or {}).get("class_type")
            progress(Progress(kind, **kw))

    noticed = []

    def connect():
        try:
            return _WebSocket(http.ws_url(client_id), http.headers, timeout=min(30.0, max(1.0, deadline - time.monotonic())))
        except (OSError, _WebSocketClosed) as e:
            if not noticed:  # once
                noticed.append(e)
                emit("notice", message=f"websocket unavailable ({e}); polling /history instead")
            return None

    wsbox = [connect()]
    prompt_id = None
    try:
        status, body = http.request("/prompt", {"prompt": graph, "client_id": client_id}, method="POST")
        if status == 400 or (status == 200 and isinstance(body, dict) and body.get("error") and "prompt_id" not in body):
            raise ValidationError(_format_validation(body, graph), body)
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise ServerError(f"POST /prompt: HTTP {status}: {str(body)[:1000]}")
        prompt_id = body["prompt_id"]
        emit("queued", prompt_id=prompt_id, data=body)
        entry = _wait(http, wsbox, connect, prompt_id, deadline, emit)
    except (RunTimeout, KeyboardInterrupt):
        if prompt_id and cancel_on_timeout:
            _cancel(http, prompt_id)
        raise
    finally:
        if wsbox[0] is not None:
            wsbox[0].close()

    status = entry.get("status") or {}
    node_outputs = entry.get("outputs") or {}
    _raise_if_failed(status, graph, prompt_id)
    paths = download_outputs(http, node_outputs, out_dir) if out_dir is not None else []
    emit("done", prompt_id=prompt_id, data={"outputs": paths})
    return RunResult(prompt_id, paths, node_outputs, status, path)


def _raise_if_failed(status: dict, graph: dict, prompt_id: str):
    """ExecutionError when the /history status says the prompt failed or was interrupted."""
    if status.get("status_str") == "error" or status.get("completed") is False:
        for kind, data in status.get("messages") or []:
            if kind == "execution_error":
                raise ExecutionError(_format_execution_error(data, graph), data, prompt_id)
            if kind == "execution_interrupted":
                nid = data.get("node_id")
                raise ExecutionError("execution interrupted" + (f" in {node_label(graph, nid)}" if nid else ""),
                                     data, prompt_id)
        raise ExecutionError(f"execution failed: {status}", {}, prompt_id)


def _history_entry(http: _Http, prompt_id: str) -> dict | None:
    h = http.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
    entry = (h or {}).get(prompt_id)
    if entry and (entry.get("status") or {}).get("status_str") in ("success", "error"):
        return entry
    if entry and "status" not in entry:  # very old servers: no status, outputs only
        return entry
    return None


def _wait(http, wsbox, connect, prompt_id, deadline, emit) -> dict:
    """Follows the prompt on the websocket (wsbox[0], reconnected when lost) and returns its
    /history entry; /history is also polled every few seconds, so a missed message cannot hang it."""
    ws = wsbox[0]
    finished = False
    last_poll = last_connect = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise RunTimeout(f"prompt {prompt_id} did not finish within the timeout", prompt_id)
        if ws is None and now - last_connect > 5:
            last_connect = now
            ws = wsbox[0] = connect()
        msg = None
        if ws is not None and not finished:
            try:
                msg = ws.recv(min(1.0, deadline - now))
            except (_WebSocketClosed, OSError) as e:
                emit("notice", message=f"websocket lost ({e}); polling /history")
                ws.close()
                ws = wsbox[0] = None
        else:
            time.sleep(min(0.25 if finished else 1.0, max(0.0, deadline - now)))
        if isinstance(msg, str):
            try:
                m = json.loads(msg)
            except ValueError:
                m = {}
            kind, data = m.get("type"), m.get("data") or {}
            if isinstance(data, dict) and data.get("prompt_id") in (None, prompt_id):
                ours = data.get("prompt_id") == prompt_id
                if kind == "execution_start" and ours:
                    emit("start", prompt_id=prompt_id)
                elif kind == "execution_cached" and ours:
                    emit("cached", prompt_id=prompt_id, data=data)
                elif kind == "executing" and ours:
                    if data.get("node") is None:
                        finished = True
                    else:
                        emit("executing", prompt_id=prompt_id, node=data.get("display_node") or data["node"], data=data)
                elif kind == "progress" and ours:
                    emit("progress", prompt_id=prompt_id, node=data.get("node"), value=data.get("value"),
                         max=data.get("max"), data=data)
                elif kind == "executed" and ours:
                    emit("executed", prompt_id=prompt_id, node=data.get("display_node") or data.get("node"), data=data)
                elif kind in ("execution_success", "execution_error", "execution_interrupted") and ours:
                    finished = True
        now = time.monotonic()
        if finished or ws is None or now - last_poll > 5:
            last_poll = now
            entry = _history_entry(http, prompt_id)
            if entry is not None:
                return entry


def _cancel(http: _Http, prompt_id: str):
    """Takes our own prompt off the queue, or interrupts it if it is the one running (checked first:
    servers older than targeted interrupts would stop whatever runs)."""
    try:
        http.request("/queue", {"delete": [prompt_id]}, method="POST")
        status, queue = http.request("/queue")
        running = (queue or {}).get("queue_running") or [] if status == 200 else []
        if any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in running):
            http.request("/interrupt", {"prompt_id": prompt_id}, method="POST")
    except ClientError:
        pass
