"""Start a real ComfyUI server (the harness tree) with this pack in custom_nodes, and talk to it.

Used by the end-to-end tests (tests/harness/server.py re-exports it) and by the main job
(tools/main_job.py, scripts/run_main.sh). Standard library only.

The tree is $QUANTLORA_COMFYUI, by default .harness/ComfyUI (ComfyUI v0.33.0, the primary harness;
scripts/test.sh also points it at .harness/ComfyUI-0.3.75, the oldest supported version). Both start
the same way on CPU. What differs between them for a client: v0.33 refuses a client-chosen prompt_id
that is not a canonical UUID (400 invalid_prompt_id), so `queue` sends none or a UUID, and validation
errors have other types and messages (see `validation_errors`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .bootstrap import COMFY, ROOT, STUBS, needs_stubs  # noqa: F401 - re-exported (tests/harness/server.py, main_job)

PACK_DIR_NAME = "QuantLoRA"


def comfy_version(tree: str = COMFY) -> str:
    """The version string of a ComfyUI tree (comfyui_version.py), or "unknown"."""
    try:
        with open(os.path.join(tree, "comfyui_version.py"), encoding="utf-8") as f:
            m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", f.read())
    except OSError:
        return "unknown"
    return m.group(1) if m else "unknown"


def version_tuple(v: str) -> tuple:
    """"0.33.0" -> (0, 33, 0); () when it does not parse."""
    try:
        return tuple(int(p) for p in v.split("+")[0].split(".")[:3])
    except ValueError:
        return ()


COMFY_VERSION = comfy_version()

# Run ComfyUI's main.py with the import-only torchvision/torchaudio stand-ins on the path, but
# only after transformers and diffusers have recorded that torchvision is absent: otherwise they
# import torchvision submodules the stand-ins do not have (e.g. when optimum-quanto loads).
_BOOT = """import runpy, sys
import diffusers.utils.import_utils
import transformers.utils.import_utils as t
t.is_torchvision_available()
sys.path.insert(1, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class PromptError(RuntimeError):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


class ComfyServer:
    def __init__(self, base_dir: str, extra_args=(), env=None, port: int | None = None, listen: str = "127.0.0.1",
                 cpu: bool = True):
        self.base = base_dir
        self.port = port or free_port()
        self.listen = listen
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args, self.env_extra = list(extra_args), env or {}
        self.cpu = cpu
        self.proc = None
        self.client_id = uuid.uuid4().hex
        self.version = COMFY_VERSION
        self.version_tuple = version_tuple(COMFY_VERSION)

    def command(self) -> list[str]:
        args = [*(["--cpu"] if self.cpu else []), "--listen", self.listen, "--port", str(self.port),
                "--disable-auto-launch", "--base-directory", self.base, "--database-url", "sqlite:///:memory:",
                "--disable-api-nodes", *self.extra_args]
        main = os.path.join(COMFY, "main.py")
        if needs_stubs():
            return [sys.executable, "-c", _BOOT, STUBS, main, *args]
        return [sys.executable, main, *args]

    # -- lifecycle --
    def start(self, timeout: float = 180) -> "ComfyServer":
        nodes_dir = os.path.join(self.base, "custom_nodes")
        os.makedirs(nodes_dir, exist_ok=True)
        link = os.path.join(nodes_dir, PACK_DIR_NAME)
        if not os.path.exists(link):
            os.symlink(ROOT, link)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env_extra)
        self.log_path = os.path.join(self.base, "server.log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=COMFY, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/system_stats"):
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # -- HTTP --
    def _request(self, path, data=None, method=None, raw=False, timeout=60):
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                err = json.loads(text)
            except ValueError:
                err = text.decode(errors="replace")
            raise PromptError(e.code, err) from None
        return payload if raw else (json.loads(payload) if payload else None)

    def get(self, path, raw=False):
        return self._request(path, raw=raw)

    def post(self, path, data):
        return self._request(path, data=data, method="POST")

    def object_info(self, node: str) -> dict:
        return self.get(f"/object_info/{node}")[node]

    def queue(self, graph: dict, prompt_id: str | None = None) -> str:
        """POST /prompt; the server picks the id unless `prompt_id` is given (v0.33+: a canonical UUID)."""
        body = {"prompt": graph, "client_id": self.client_id}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        return self.post("/prompt", body)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise RuntimeError(f"server died:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(graph), timeout)

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{q}", raw=True)


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a history entry, or None if it succeeded."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def validation_errors(body: dict) -> list[tuple[str | None, str, str]]:
    """(node id or None, type, message + details) for every error in a /prompt 400 answer, in the
    shapes of both ComfyUI 0.3.75 and v0.33: the top-level "error" (a dict, or a plain string on
    some old paths) and each node_errors entry's "errors". Types differ between them (an unknown
    class_type is "invalid_prompt" in 0.3.75, "missing_node_type" in v0.33; a V3 node's input is
    named by its full id or by its last part), so tests match on what both say."""
    out = []
    err = body.get("error") if isinstance(body, dict) else body
    if isinstance(err, dict):
        out.append((err.get("extra_info", {}).get("node_id") if isinstance(err.get("extra_info"), dict) else None,
                    str(err.get("type", "")), f"{err.get('message', '')}: {err.get('details', '')}"))
    elif err:
        out.append((None, "", str(err)))
    for nid, info in ((body.get("node_errors") if isinstance(body, dict) else None) or {}).items():
        for e in (info or {}).get("errors") or []:
            out.append((str(nid), str(e.get("type", "")), f"{e.get('message', '')}: {e.get('details', '')}"))
    return out


def reset_base(base: str):
    for sub in ("output", "temp"):
        shutil.rmtree(os.path.join(base, sub), ignore_errors=True)
