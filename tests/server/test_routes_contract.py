"""Layer 3: the contract of the HTTP routes the pack adds (nodes/routes.py), through the real server.

- Read-only except POST /quantlora/vram/reset: every other method on every pack path (and its
  /api mirror) answers 405 with an Allow header, never ComfyUI's static-file 404 or a handler.
  (OPTIONS never reaches a route: ComfyUI's own middleware answers every preflight with an empty 200.)
- No path or file is taken from request data: query strings and bodies naming files (a FIFO that
  would block whoever opened it, a file with a marker inside) change nothing in the answer.
- Responses are bounded (< 64 KB), also after a prompt with a 5000-character prompt id and 500
  nodes with 1000-character ids, all of them client-controlled.
"""
import http.client
import json
import os
import uuid

import pytest

from harness.server import PromptError

pytestmark = [pytest.mark.server, pytest.mark.no_demo_models]

LIMIT = 64 * 1024
ROUTES = {"/quantlora/vram": {"GET", "HEAD"}, "/quantlora/vram/reset": {"POST"}, "/quantlora/stats": {"GET", "HEAD"}}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def request(server, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def all_paths():
    return [(p, allowed) for route, allowed in ROUTES.items() for p in (route, "/api" + route)]


def test_other_methods_are_405(server):
    for path, allowed in all_paths():
        for method in METHODS:
            if method == "POST" and path.endswith("/reset"):
                continue
            status, headers, body = request(server, method, path)
            if method == "OPTIONS":  # ComfyUI's middleware answers every preflight itself, empty, before routing
                assert status in (200, 405) and body in (b"", b"405: Method Not Allowed"), (path, status, body[:200])
            elif method in allowed:
                assert status == 200, (method, path, status, body[:200])
            else:
                assert status == 405, (method, path, status, body[:200])
                assert set(headers["allow"].replace(" ", "").split(",")) == allowed, (method, path, headers)
                assert len(body) < 1024


def test_reads_change_nothing_and_ignore_request_data(server, tmp_path):
    fifo = str(tmp_path / "would-block")
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a handler that opened it would hang
    marker = tmp_path / "secret.json"
    secret = uuid.uuid4().hex
    marker.write_text(json.dumps({"secret": secret}))
    paths = {"path": fifo, "file": str(marker), "filename": "../../../etc/passwd", "device": "cuda:99", "reset": "1"}
    query = "&".join(f"{k}={v}" for k, v in paths.items())

    before_vram = server.get("/quantlora/vram")
    before_stats = server.get("/quantlora/stats")
    for path in ("/quantlora/vram", "/quantlora/stats"):
        for api in ("", "/api"):
            status, _, body = request(server, "GET", f"{api}{path}?{query}", timeout=10)
            assert status == 200 and secret.encode() not in body and b"passwd" not in body
            got = json.loads(body)
            if path.endswith("vram"):
                assert set(got) == set(before_vram) and got["peak_reset_at"] == before_vram["peak_reset_at"]
                assert got["devices"] == [] or len(got["devices"]) == len(before_vram["devices"])
            else:
                assert got == before_stats  # nothing ran in between: the same numbers
    # the reset: its body and query are ignored too, whatever their size
    for body in (paths, b"\x00\xff" * 512 * 1024, b"not json"):
        status, _, out = request(server, "POST", f"/quantlora/vram/reset?{query}", body=body, timeout=10)
        assert status == 200 and secret.encode() not in out
        snap = json.loads(out)
        assert set(snap) == set(before_vram) and snap["peak_reset_at"] > before_vram["peak_reset_at"]
    assert open(marker).read() == json.dumps({"secret": secret})  # untouched


def test_stats_shape(server):
    s = server.get("/quantlora/stats")
    assert set(s) == {"lora_cache", "hotswap", "merge"}
    assert set(s["lora_cache"]) == {"entries", "capacity", "parses"} and set(s["hotswap"]) == {"models", "active", "swaps"}
    assert set(s["merge"]) == {"models", "active", "swaps", "pristine_bytes"}
    assert 0 <= s["lora_cache"]["entries"] <= s["lora_cache"]["capacity"]
    assert all(isinstance(v, int) and v >= 0 for part in s.values() for v in part.values())


def _tree_graph(leaves: int, id_len: int) -> dict:
    """`leaves` tiny latents joined by LatentBatch in a binary tree into one SaveLatent; ids id_len long."""
    nid = lambda kind, i: f"{kind}-{i}-".ljust(id_len, "x")  # noqa: E731
    g, level = {}, []
    for i in range(leaves):
        # all different (identical nodes would be served from ComfyUI's cache and not execute)
        size = {"width": 16 * (1 + i % 16), "height": 16 * (1 + i // 16 % 16), "batch_size": 1 + i // 256}
        g[nid("leaf", i)] = {"class_type": "EmptySD3LatentImage", "inputs": size}
        level.append(nid("leaf", i))
    k = 0
    while len(level) > 1:
        nxt = []
        for a, b in zip(level[::2], level[1::2]):
            g[nid("join", k)] = {"class_type": "LatentBatch", "inputs": {"samples1": [a, 0], "samples2": [b, 0]}}
            nxt.append(nid("join", k))
            k += 1
        level = nxt
    g[nid("save", 0)] = {"class_type": "SaveLatent", "inputs": {"samples": [level[0], 0], "filename_prefix": "routes-bound"}}
    return g


def test_responses_stay_bounded_with_client_controlled_ids(server):
    g = _tree_graph(256, 1000)
    assert len(g) == 512
    # ComfyUI 0.3.75 takes any client-chosen prompt id; v0.33 refuses one that is not a UUID (400,
    # nothing queued). Where it is refused, the node ids (1000 characters each) are what the client
    # controls, and the id is a UUID.
    prompt_id = "p" * 5000
    try:
        out = server.post("/prompt", {"prompt": g, "client_id": server.client_id, "prompt_id": prompt_id})
    except PromptError as e:
        assert e.status == 400 and e.body["error"]["type"] == "invalid_prompt_id", e.body
        assert server.version_tuple >= (0, 33), server.version
        prompt_id = str(uuid.uuid4())
        out = server.post("/prompt", {"prompt": g, "client_id": server.client_id, "prompt_id": prompt_id})
    assert out["prompt_id"] == prompt_id
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    for path in ("/quantlora/vram", "/api/quantlora/vram", "/quantlora/stats"):
        status, _, body = request(server, "GET", path)
        assert status == 200 and len(body) < LIMIT, (path, len(body))
    snap = server.get("/quantlora/vram")
    rec = snap["prompt"]
    assert rec is not None and prompt_id.startswith(rec["prompt_id"]) and len(rec["prompt_id"]) <= 64
    assert len(rec["nodes"]) == 256 and all(len(n) <= 64 for n in rec["nodes"])  # more ran; 256 are kept
    status, _, body = request(server, "POST", "/quantlora/vram/reset")
    assert status == 200 and len(body) < LIMIT
