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

import base64
import copy
import dataclasses
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable

__all__ = ["run_workflow", "load_workflow", "apply_overrides", "RunResult", "Progress", "ClientError",
           "WorkflowError", "ServerError", "ValidationError", "ExecutionError", "RunTimeout"]


# -- errors (each carries the CLI's exit code) --

class ClientError(Exception):
    exit_code = 1


class WorkflowError(ClientError):
    """The workflow file or an override is wrong (nothing was sent to the server)."""
    exit_code = 2


class ServerError(ClientError):
    """The server could not be reached or answered something unexpected."""
    exit_code = 4


class ValidationError(ClientError):
    """POST /prompt answered 400: the server's validation errors are in .body."""
    exit_code = 1

    def __init__(self, message: str, body: Any = None):
        super().__init__(message)
        self.body = body


class ExecutionError(ClientError):
    """The prompt was queued and failed (or was interrupted) while running: .data is the server's message."""
    exit_code = 1

    def __init__(self, message: str, data: dict | None = None, prompt_id: str | None = None):
        super().__init__(message)
        self.data, self.prompt_id = data or {}, prompt_id


class RunTimeout(ClientError):
    exit_code = 3

    def __init__(self, message: str, prompt_id: str | None = None):
        super().__init__(message)
        self.prompt_id = prompt_id


@dataclasses.dataclass
class Progress:
    """One progress report. kind: queued, start, cached, executing, progress, executed, done, notice."""
    kind: str
    prompt_id: str | None = None
    node: str | None = None
    title: str | None = None
    class_type: str | None = None
    value: float | None = None
    max: float | None = None
    message: str | None = None
    data: dict | None = None


@dataclasses.dataclass
class RunResult:
    prompt_id: str
    outputs: list  # local paths of the downloaded files
    node_outputs: dict  # /history outputs: node id -> {"images": [...], ...}
    status: dict = dataclasses.field(default_factory=dict)
    workflow_path: str | None = None  # the file actually run (an .api.json twin may replace a UI file)


# -- workflow files --

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


# -- HTTP --

class _Http:
    def __init__(self, url: str, headers: dict | None = None, timeout: float = 60):
        if "://" not in url:
            url = "http://" + url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ServerError(f"server URL {url!r}: expected http:// or https://")
        self.headers = dict(headers or {})
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username is not None:  # http://user:pass@host: HTTP basic auth
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self.headers.setdefault("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.timeout = timeout

    def ws_url(self, client_id: str) -> str:
        scheme = "wss" if self.base.startswith("https:") else "ws"
        return scheme + self.base[self.base.index(":"):] + "/ws?clientId=" + urllib.parse.quote(client_id)

    def request(self, path: str, data: Any = None, method: str | None = None, raw: bool = False):
        body = json.dumps(data).encode() if data is not None else None
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                err = json.loads(text)
            except ValueError:
                err = text.decode(errors="replace")
            e.close()
            return e.code, err
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"cannot reach the ComfyUI server at {self.base}: {reason}") from None
        if raw:
            return 200, payload
        try:
            return 200, json.loads(payload) if payload else None
        except ValueError:
            raise ServerError(f"{self.base}{path}: the server did not answer JSON (is this a ComfyUI server?): "
                              f"{payload[:200]!r}") from None

    def get_json(self, path: str):
        status, body = self.request(path)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {str(body)[:500]}")
        return body

    def download(self, path: str, dest: str):
        req = urllib.request.Request(self.base + path, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r, open(dest + ".part", "wb") as f:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            try:
                os.remove(dest + ".part")
            except OSError:
                pass
            code = getattr(e, "code", None)
            raise ServerError(f"download {path} failed: {f'HTTP {code}' if code else getattr(e, 'reason', e)}") from None
        os.replace(dest + ".part", dest)


# -- a minimal websocket client (RFC 6455: text/binary/ping/close, fragmented messages) --

class _WebSocketClosed(ConnectionError):
    pass


class _WebSocket:
    _GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, headers: dict | None = None, timeout: float = 30):
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "wss"
        host, port = parts.hostname, parts.port or (443 if secure else 80)
        sock = socket.create_connection((host, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        self.sock, self.buf, self._parts = sock, b"", []
        key = base64.b64encode(os.urandom(16)).decode()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if ":" not in host else f"[{host}]"
        if parts.port:
            host_header += f":{parts.port}"
        lines = [f"GET {path} HTTP/1.1", f"Host: {host_header}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise _WebSocketClosed("connection closed during the websocket handshake")
            self.buf += chunk
            if len(self.buf) > 65536:
                raise _WebSocketClosed("websocket handshake: oversized answer")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in status_line + " ":
            raise _WebSocketClosed(f"websocket handshake refused: {status_line}")
        got = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        want = base64.b64encode(hashlib.sha1((key + self._GUID).encode()).digest()).decode()
        if got.get("sec-websocket-accept") != want:
            raise _WebSocketClosed("websocket handshake: bad Sec-WebSocket-Accept")

    def _send(self, opcode: int, payload: bytes = b""):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def _frame(self):
        """(fin, opcode, payload) from the buffer, or None when it holds no whole frame yet."""
        b = self.buf
        if len(b) < 2:
            return None
        fin, opcode, masked, n = b[0] & 0x80, b[0] & 0x0F, b[1] & 0x80, b[1] & 0x7F
        i = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = struct.unpack("!H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = struct.unpack("!Q", b[2:10])[0], 10
        if masked:
            if len(b) < i + 4:
                return None
            mask, i = b[i:i + 4], i + 4
        if len(b) < i + n:
            return None
        payload = b[i:i + n]
        if masked:
            payload = bytes(c ^ mask[j % 4] for j, c in enumerate(payload))
        self.buf = b[i + n:]
        return bool(fin), opcode, payload

    def recv(self, timeout: float):
        """The next message (str for text, bytes for binary), or None when none came within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(1 << 16)
                except (socket.timeout, TimeoutError):
                    return None
                except OSError as e:
                    raise _WebSocketClosed(str(e)) from None
                if not chunk:
                    raise _WebSocketClosed("the server closed the websocket")
                self.buf += chunk
                continue
            fin, opcode, payload = frame
            if opcode == 0x8:
                try:
                    self._send(0x8, payload[:2])
                except OSError:
                    pass
                raise _WebSocketClosed("the server closed the websocket")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                self._parts = [(opcode, payload)]
            elif opcode == 0x0 and self._parts:
                self._parts.append((0, payload))
            else:
                continue
            if fin:
                kind, data = self._parts[0][0], b"".join(p for _, p in self._parts)
                self._parts = []
                return data.decode("utf-8", errors="replace") if kind == 0x1 else data

    def close(self):
        try:
            self._send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


# -- running --

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


def _safe_relpath(subfolder: str, filename: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", subfolder or "") if p not in ("", ".", "..")]
    name = os.path.basename((filename or "").replace("\\", "/")) or "output"
    return os.path.join(*parts, name)


def _unique(path: str) -> str:
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(f"{stem}-{i}{ext}"):
        i += 1
    return f"{stem}-{i}{ext}"


def output_files(node_outputs: dict) -> list[tuple[str, dict]]:
    """(node id, file entry) for every file the outputs name: {"filename", "subfolder", "type"} dicts
    under any key (images, gifs, audio, video, 3d, ...)."""
    files = []
    for nid, out in (node_outputs or {}).items():
        if not isinstance(out, dict):
            continue
        for value in out.values():
            if isinstance(value, list):
                files += [(nid, v) for v in value if isinstance(v, dict) and v.get("filename")]
    return files


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
    if status.get("status_str") == "error" or status.get("completed") is False:
        for kind, data in status.get("messages") or []:
            if kind == "execution_error":
                raise ExecutionError(_format_execution_error(data, graph), data, prompt_id)
            if kind == "execution_interrupted":
                nid = data.get("node_id")
                raise ExecutionError("execution interrupted" + (f" in {node_label(graph, nid)}" if nid else ""),
                                     data, prompt_id)
        raise ExecutionError(f"execution failed: {status}", {}, prompt_id)

    paths = []
    if out_dir is not None:
        for nid, f in output_files(node_outputs):
            dest = _unique(os.path.join(os.fspath(out_dir), _safe_relpath(f.get("subfolder", ""), f["filename"])))
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            q = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""),
                                        "type": f.get("type", "output")})
            http.download(f"/view?{q}", dest)
            paths.append(dest)
    emit("done", prompt_id=prompt_id, data={"outputs": paths})
    return RunResult(prompt_id, paths, node_outputs, status, path)


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
