"""The headless client (client/): run_workflow and `python -m client` against a real ComfyUI server.

The exit-code tests run the CLI as a subprocess from the repo root, as a user would."""
import itertools
import json
import os
import random
import subprocess
import sys
import uuid

import pytest
from PIL import Image

from graphs import loader, txt2img
from quantlora.client import Progress, WorkflowError, apply_overrides, load_workflow, run_workflow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_seeds = itertools.count(int.from_bytes(os.urandom(3), "big"))  # fresh seeds: never served from cache


def titled(graph: dict) -> dict:
    """txt2img with titles on some nodes, as an Export (API) file has them."""
    for nid, title in (("model", "Load Flux"), ("sample", "Sampler"), ("save", "Save v1.2")):
        graph[nid]["_meta"] = {"title": title}
    return graph


def write(tmp_path, graph, name="wf.api.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(graph) if not isinstance(graph, str) else graph)
    return str(path)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_png(path, prefix):
    assert os.path.basename(path).startswith(prefix), path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        im.verify()


# -- through the server --

@pytest.mark.server
def test_run_workflow_overrides_progress_downloads(server, tmp_path):
    seed = next(_seeds)
    path = write(tmp_path, titled(txt2img(loader(), seed=1, prefix="unchanged")))
    events = []
    result = run_workflow(server.url, path, [f"Sampler.seed={seed}", "save.filename_prefix=client-api",
                                             "Sampler.steps=3"],
                          out_dir=tmp_path / "out", timeout=600, progress=events.append)
    # overrides reached the server: by title (with the value parsed as JSON) and by id
    prompt = server.get(f"/history/{result.prompt_id}")[result.prompt_id]["prompt"][2]
    assert prompt["sample"]["inputs"]["seed"] == seed and prompt["sample"]["inputs"]["steps"] == 3
    assert prompt["save"]["inputs"]["filename_prefix"] == "client-api"
    # outputs downloaded, valid PNGs with the overridden prefix
    assert len(result.outputs) == 1 and str(tmp_path / "out") in result.outputs[0]
    assert_png(result.outputs[0], "client-api")
    assert result.node_outputs["save"]["images"][0]["filename"] == os.path.basename(result.outputs[0])
    # progress: sampler steps with value/max and the node's title
    assert all(isinstance(e, Progress) for e in events)
    steps = [e for e in events if e.kind == "progress" and e.title == "Sampler"]
    assert steps and steps[-1].value == steps[-1].max == 3, [e for e in events if e.kind == "progress"]
    kinds = [e.kind for e in events]
    assert kinds[0] == "queued" and "executing" in kinds and kinds[-1] == "done"
    assert "Save v1.2" in {e.title for e in events if e.kind == "executing"}


@pytest.mark.server
def test_cli_runs_and_prints_downloaded_paths(server, tmp_path):
    path = write(tmp_path, titled(txt2img(loader(), seed=1)))
    out = tmp_path / "cli-out"
    r = cli(path, "--url", server.url, "--set", f"KSampler.seed={next(_seeds)}",  # a class_type that is unique
            "--set", 'Save v1.2.filename_prefix="client-cli"', "--out", str(out))
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert len(paths) == 1 and paths[0].startswith(str(out))
    assert_png(paths[0], "client-cli")
    assert "queued prompt" in r.stderr and "2/2 Sampler" in r.stderr and "running Sampler (KSampler)" in r.stderr, r.stderr


@pytest.mark.server
def test_cli_validation_error_exit_1(server, tmp_path):
    graph = titled(txt2img(loader(), seed=next(_seeds)))
    graph["sample"]["inputs"]["sampler_name"] = "no-such-sampler"
    r = cli(write(tmp_path, graph), "--url", server.url, "--out", str(tmp_path / "o"))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "rejected the prompt" in r.stderr and "Value not in list" in r.stderr, r.stderr
    assert "node sample ('Sampler', KSampler)" in r.stderr and "no-such-sampler" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.server
@pytest.mark.no_demo_models
def test_cli_validation_errors_of_stock_nodes_exit_1(server, tmp_path):
    """Validation errors as this server version words them (stock nodes only, no model file): an
    input below its minimum (a node error) and an unknown node type (a prompt error, tied to its
    node by v0.33, named only in the details by 0.3.75)."""
    graph = {"latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 8, "height": 64, "batch_size": 1},
                        "_meta": {"title": "Size"}},
             "save": {"class_type": "SaveLatent", "inputs": {"samples": ["latent", 0], "filename_prefix": "v"}}}
    r = cli(write(tmp_path, graph), "--url", server.url, "--out", str(tmp_path / "o"))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "rejected the prompt" in r.stderr and "node latent ('Size', EmptySD3LatentImage)" in r.stderr, r.stderr
    assert "smaller than min" in r.stderr and "width" in r.stderr, r.stderr

    graph["latent"]["class_type"] = "NoSuchNode-QuantLoRA-Test"
    r = cli(write(tmp_path, graph), "--url", server.url, "--out", str(tmp_path / "o"))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "rejected the prompt" in r.stderr and "NoSuchNode-QuantLoRA-Test" in r.stderr, r.stderr
    if server.version_tuple >= (0, 33):
        assert "node latent ('Size', NoSuchNode-QuantLoRA-Test)" in r.stderr and "not found" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.server
def test_cli_bad_quantization_exit_1(server, tmp_path):
    # ComfyUI 0.3.75 does not check a V3 combo's value (a later one answers 400); either way the
    # client exits 1 with the server's message naming the value.
    graph = titled(txt2img(loader(quantization="bnb-q3"), seed=next(_seeds)))
    r = cli(write(tmp_path, graph), "--url", server.url, "--out", str(tmp_path / "o"))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "bnb-q3" in r.stderr and "error:" in r.stderr, r.stderr
    if "rejected the prompt" not in r.stderr:
        assert "execution failed in node model ('Load Flux', QuantizedFluxLoader)" in r.stderr, r.stderr


@pytest.mark.server
def test_cli_execution_error_exit_1_with_pack_message(server, tmp_path):
    name = f"bad-client-{uuid.uuid4().hex[:8]}.safetensors"
    with open(os.path.join(server.base, "models", "diffusion_models", name), "wb") as f:
        f.write(bytes([0x11]) + random.Random(3).randbytes(64 * 1024))
    graph = titled(txt2img(loader(name), seed=next(_seeds)))
    r = cli(write(tmp_path, graph), "--url", server.url, "--out", str(tmp_path / "o"))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "execution failed in node model ('Load Flux', QuantizedFluxLoader)" in r.stderr, r.stderr
    assert "QuantLoRAError" in r.stderr and name in r.stderr and "not a valid safetensors file" in r.stderr, r.stderr


@pytest.mark.server
def test_cli_timeout_exit_3_and_cancels(server, tmp_path):
    # Hold the queue with a long prompt so ours is still pending at the timeout: the client must
    # exit 3 and take it off the queue (it never runs).
    blocker = server.queue(txt2img(loader(), seed=next(_seeds), steps=10000, prefix="blocker"))
    try:
        graph = titled(txt2img(loader(), seed=next(_seeds)))
        r = cli(write(tmp_path, graph), "--url", server.url, "--timeout", "1", "--out", str(tmp_path / "o"))
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert "did not finish within the timeout" in r.stderr, r.stderr
        prompt_id = r.stderr.split("queued prompt ")[1].split()[0]
        queue = server.get("/queue")
        assert prompt_id not in [item[1] for item in queue["queue_pending"] + queue["queue_running"]], queue
    finally:
        server.post("/interrupt", {"prompt_id": blocker})
        server.wait(blocker, timeout=300)
    assert server.get(f"/history/{prompt_id}") == {}  # never ran


def test_unreachable_server_exit_4(tmp_path):
    from harness.server import free_port

    r = cli(write(tmp_path, titled(txt2img(loader()))), "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "10")
    assert r.returncode == 4 and "cannot reach the ComfyUI server" in r.stderr, (r.returncode, r.stderr)


# -- the workflow file and overrides (no server needed) --

def test_cli_malformed_json_exit_2_names_file(tmp_path):
    path = write(tmp_path, '{"1": {"class_type": "KSampler", "inputs": {"seed": 1,}}}', name="broken.json")
    r = cli(path, "--url", "http://127.0.0.1:9")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert path in r.stderr and "malformed JSON" in r.stderr and "line 1 column" in r.stderr, r.stderr


def test_ui_format_needs_api_export_or_uses_twin(tmp_path):
    ui = {"last_node_id": 1, "nodes": [{"id": 1, "type": "KSampler", "widgets_values": [1]}], "links": []}
    path = write(tmp_path, ui, name="flow.json")
    r = cli(path, "--url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "UI-format" in r.stderr and "Export (API)" in r.stderr, r.stderr
    write(tmp_path, titled(txt2img(loader())), name="flow.api.json")
    graph, used = load_workflow(path)
    assert used == str(tmp_path / "flow.api.json") and graph["sample"]["class_type"] == "KSampler"
    r = cli(path, "--list")
    assert r.returncode == 0 and "sample: 'Sampler' (KSampler)" in r.stdout, r.stderr


def test_override_errors_list_nodes_and_inputs(tmp_path):
    path = write(tmp_path, titled(txt2img(loader())))
    r = cli(path, "--set", "Nope.seed=1", "--url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "no node with id, title or class_type 'Nope'" in r.stderr, r.stderr
    assert "sample: 'Sampler' (KSampler)" in r.stderr and "model: 'Load Flux' (QuantizedFluxLoader)" in r.stderr
    r = cli(path, "--set", "Sampler.sed=1", "--url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "has no input 'sed'" in r.stderr and "seed, steps, cfg" in r.stderr, r.stderr
    r = cli(path, "--set", "Sampler.seed", "--url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "expected NODE.input=value" in r.stderr, r.stderr


def test_override_values_and_node_references():
    g = titled(txt2img(loader()))
    g["pos2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["clip", 0]}}
    out = apply_overrides(g, ["Sampler.cfg=2.5", "Save v1.2.filename_prefix=a=b", "pos.text=[1, 2]",
                              "Load Flux.quantization=bnb-nf4", "KSampler.denoise=true", 'latent.width="64"'])
    assert out["sample"]["inputs"]["cfg"] == 2.5 and out["sample"]["inputs"]["denoise"] is True
    assert out["save"]["inputs"]["filename_prefix"] == "a=b"  # value after the first '='; title with dots
    assert out["pos"]["inputs"]["text"] == [1, 2] and out["latent"]["inputs"]["width"] == "64"
    assert out["model"]["inputs"]["quantization"] == "bnb-nf4"
    assert g["sample"]["inputs"]["cfg"] == 1.0  # the input graph is not modified
    out = apply_overrides(g, {"Sampler": {"seed": 5}, "save.filename_prefix": "7"})
    assert out["sample"]["inputs"]["seed"] == 5 and out["save"]["inputs"]["filename_prefix"] == "7"
    with pytest.raises(WorkflowError, match="several nodes"):
        apply_overrides(g, ["CLIPTextEncode.text=y"])


# The 400 answers of both supported servers, as they send them (recorded from 0.3.75 and v0.33.0).
OLD_MISSING = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node Nope does not exist.",
                         "details": "Node ID '#n1'", "extra_info": {}}, "node_errors": {}}
NEW_MISSING = {"error": {"type": "missing_node_type", "message": "Node 'Loader' not found. The custom node may not be "
                         "installed.", "details": "Node ID '#n1'",
                         "extra_info": {"node_id": "n1", "class_type": "Nope", "node_title": "Loader"}}, "node_errors": {}}
NEW_BAD_UUID = {"error": {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
                          "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it "
                          "to let the server generate one", "extra_info": {}}, "node_errors": {}}
COMBO = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                   "details": "", "extra_info": {}},
         "node_errors": {"n1": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                            "details": "quantization: 'bnb-q3' not in ['none', 'bnb-nf4']",
                                            "extra_info": {}}],
                                "dependent_outputs": ["n2"], "class_type": "QuantizedFluxLoader"}}}


def test_validation_messages_of_both_server_versions():
    from quantlora.client import _format_validation

    graph = {"n1": {"class_type": "Nope", "inputs": {}, "_meta": {"title": "Loader"}},
             "n2": {"class_type": "SaveImage", "inputs": {}}}
    old = _format_validation(OLD_MISSING, graph)
    assert old == "the server rejected the prompt: Cannot execute because node Nope does not exist.: Node ID '#n1'"
    new = _format_validation(NEW_MISSING, graph)
    assert new.startswith("the server rejected the prompt: node n1 ('Loader', Nope): Node 'Loader' not found"), new
    assert "must be a valid UUID" in _format_validation(NEW_BAD_UUID, graph)
    combo = _format_validation(COMBO, graph).splitlines()
    assert combo[0] == "the server rejected the prompt: Prompt outputs failed validation", combo
    assert combo[1] == ("  node n1 ('Loader', QuantizedFluxLoader): Value not in list: quantization: 'bnb-q3' not in "
                        "['none', 'bnb-nf4']"), combo
    assert _format_validation("Bad Request", graph) == "the server rejected the prompt: Bad Request"
    assert _format_validation({"error": "old string error", "node_errors": {"n2": "oops"}}, graph).splitlines() == [
        "the server rejected the prompt: old string error", "  node n2 (SaveImage): oops"]


def test_client_imports_only_the_standard_library():
    code = ("import sys, client, client.cli; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'comfy', 'comfy_api', 'aiohttp', 'requests', 'numpy', 'PIL', 'quantlora', 'websocket'}); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
