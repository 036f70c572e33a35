"""Layer 3: the example workflows (example_workflows/) in a real ComfyUI server with the pack.

- Each UI workflow `<name>.json` has its API twin `api/<name>.api.json`, kept in sync: the test converts
  the UI file to the API format the way the frontend's graphToPrompt does (widget values in the
  widget order of the real server's /object_info, links as [origin id, slot], frontend-only nodes
  such as Note left out) and compares it with the committed twin. (tests/browser/test_browser_workflows.py
  checks the same with the real frontend's app.graphToPrompt().) After editing a workflow in the
  UI, Export (API) it next to it, or run this file with QUANTLORA_UPDATE_EXAMPLES=1 to rewrite the twins.
- Every twin runs on the demo set through the pack's client (POST /prompt) and saves its images.
  The examples are set for real use (1024x1024, 20 steps); the runs here override the size and steps
  only, through the same overrides users pass to `python -m client --set`.
- ComfyUI's /api/workflow_templates lists them under the pack's folder and serves them (the
  frontend's Templates dialog reads exactly that).
"""
import io
import json
import os
import re

import pytest
from PIL import Image

from quantlora.client import run_workflow
from harness.server import PACK_DIR_NAME
from quantlora.tools.demo_models import DEMO_CLIP, DEMO_FLUX, DEMO_LORAS, write_demo_lora

pytestmark = pytest.mark.server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "example_workflows")
NAMES = sorted(n[: -len(".json")] for n in os.listdir(EXAMPLES) if n.endswith(".json") and not n.endswith(".api.json"))
REQUIRED = {"flux-nf4-lora", "flux-fp8-compile-lora-hotswap", "flux-low-vram-fp8-offload", "flux-lora-ab-compare"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # never in a prompt
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SIZE, STEPS = 128, 2


def path_of(name: str, suffix: str = ".json") -> str:
    # API twins live in example_workflows/api/: ComfyUI lists every top-level .json as a Template.
    return os.path.join(EXAMPLES, "api", name + suffix) if suffix == ".api.json" else os.path.join(EXAMPLES, name + suffix)


def read(name: str, suffix: str = ".json"):
    with open(path_of(name, suffix), encoding="utf-8") as f:
        return json.load(f)


# ---------- UI -> API, as the frontend does it ----------
def widget_inputs(info: dict):
    """(input name, has a control_after_generate widget) for the node's widgets, in widget order."""
    order = info.get("input_order") or {sec: list(info["input"].get(sec, {})) for sec in ("required", "optional")}
    for sec in ("required", "optional"):
        for name in order.get(sec, []):
            spec = info["input"][sec][name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if opts.get("forceInput") or not (isinstance(kind, list) or kind in WIDGET_TYPES):
                continue  # a socket only
            control = opts.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed"))
            yield name, bool(control)


def ui_to_api(ui: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in object_info, f"node {node['id']}: type {node['type']} is not installed"
        assert node.get("mode", 0) == 0, f"node {node['id']} is muted or bypassed"
        info = object_info[node["type"]]
        values = node.get("widgets_values") or []
        inputs, i = {}, 0
        for name, control in widget_inputs(info):
            inputs[name] = values[i]
            i += 2 if control else 1  # the control widget's value ("fixed", ...) is saved after it
        assert i == len(values), f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {i}"
        for slot in node.get("inputs") or []:
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        title = node.get("title") or info.get("display_name") or node["type"]
        out[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return out


def diff(got: dict, want: dict) -> list[str]:
    lines = []
    for nid in sorted(set(got) | set(want), key=lambda k: (len(k), k)):
        if got.get(nid) != want.get(nid):
            lines.append(f"node {nid}: from the UI file {json.dumps(got.get(nid))}\n"
                         f"        committed twin {json.dumps(want.get(nid))}")
    return lines


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def demo_loras(server):
    """The demo LoRAs the examples name (conftest's write_demo_set writes them; written here if not)."""
    root = os.path.join(server.base, "models")
    for name, kw in DEMO_LORAS.items():
        path = os.path.join(root, "loras", name)
        if not os.path.exists(path):
            write_demo_lora(path, os.path.join(root, "diffusion_models", DEMO_FLUX), **kw)
    return list(DEMO_LORAS)


# ---------- the files ----------
def test_examples_complete():
    assert REQUIRED <= set(NAMES), NAMES
    for name in NAMES:
        assert os.path.isfile(path_of(name, ".api.json")), f"{name}: no API twin {name}.api.json"
        thumb = os.path.join(EXAMPLES, name + ".jpg")
        assert os.path.isfile(thumb), f"{name}: no thumbnail {name}.jpg"
        assert Image.open(thumb).format == "JPEG"
        ui = read(name)
        notes = [n for n in ui["nodes"] if n["type"] == "Note"]
        assert notes and "DualCLIPLoader" in notes[0]["widgets_values"][0], \
            f"{name}: its Note must say how real FLUX.1 encodes text"


@pytest.mark.parametrize("name", NAMES)
def test_models_by_listed_names_only(name, server, object_info, demo_loras):
    """Nothing machine-specific; every combo value is one this server offers (model names as ComfyUI lists them)."""
    text = json.dumps([read(name), read(name, ".api.json")])
    for bad in (ROOT, os.path.expanduser("~"), server.base):
        assert bad not in text
    assert not re.search(r'"(/|[A-Za-z]:\\\\)[^"]*"', text), "an absolute path"
    api = read(name, ".api.json")
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for key, value in node["inputs"].items():
            kind = specs[key][0]
            options = kind if isinstance(kind, list) else None
            if kind == "COMBO":
                options = (specs[key][1] or {}).get("options")
            if options is not None:
                assert value in options, f"{name} node {nid} {key}={value!r}: not among the server's choices"
    used = {v for node in api.values() for v in node["inputs"].values() if isinstance(v, str)}
    assert DEMO_FLUX in used and DEMO_CLIP in used and "taef1" in used


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_in_sync(name, object_info):
    got, want = ui_to_api(read(name), object_info), read(name, ".api.json")
    if got != want and os.environ.get("QUANTLORA_UPDATE_EXAMPLES") == "1":
        with open(path_of(name, ".api.json"), "w", encoding="utf-8") as f:
            json.dump(got, f, indent=2)
            f.write("\n")
        want = got
    assert got == want, f"{name}.api.json is out of sync with {name}.json " \
                        f"(QUANTLORA_UPDATE_EXAMPLES=1 rewrites it):\n" + "\n".join(diff(got, want))


def test_templates_route_lists_and_serves_them(server):
    listed = server.get("/api/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == sorted(NAMES), listed  # UI files only: API twins sit in api/
    for name in NAMES:
        assert json.loads(server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json", raw=True)) == read(name)
        jpg = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg", raw=True)
        assert Image.open(io.BytesIO(jpg)).format == "JPEG"


# ---------- running them ----------
def small(api: dict, tag: str) -> dict:
    """Overrides (client --set form) for a quick run: small image, few steps, outputs under `tag`/."""
    out = {}
    for nid, node in api.items():
        inputs = node["inputs"]
        if node["class_type"] == "EmptySD3LatentImage":
            out[nid] = {"width": SIZE, "height": SIZE}
        elif "steps" in inputs:
            out[nid] = {"steps": STEPS}
        elif node["class_type"] == "SaveImage":
            out[nid] = {"filename_prefix": f"{tag}/{inputs['filename_prefix'].replace('/', '-')}"}
    return out


def cached_nodes(result) -> set:
    messages = result.status.get("messages", [])
    return {nid for kind, data in messages if kind == "execution_cached" for nid in data["nodes"]}


def check_saved(server, api: dict, result, tag: str) -> dict:
    """Every SaveImage node saved one image under `tag`/, on the server's disk; node id -> PIL image."""
    saves = [nid for nid, n in api.items() if n["class_type"] == "SaveImage"]
    images = {}
    for nid in saves:
        files = result.node_outputs[nid]["images"]
        assert len(files) == 1 and files[0]["subfolder"] == tag, files
        path = os.path.join(server.base, "output", tag, files[0]["filename"])
        assert os.path.isfile(path), path
        images[nid] = Image.open(path)
        images[nid].load()
        assert len(set(images[nid].getdata())) > 10  # a decoded image, not a fill
    if result.outputs:  # the client downloaded them
        assert sorted(os.path.basename(p) for p in result.outputs) == sorted(
            result.node_outputs[nid]["images"][0]["filename"] for nid in saves)
    return images


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs_on_demo_set(name, server, demo_loras, tmp_path):
    api = read(name, ".api.json")
    tag = f"examples-{name}"
    result = run_workflow(server.url, path_of(name, ".api.json"), overrides=small(api, tag),
                          out_dir=tmp_path, timeout=300)
    images = check_saved(server, api, result, tag)
    assert len(result.outputs) == len(images)
    for nid, image in images.items():
        if api[api[nid]["inputs"]["images"][0]]["class_type"] == "ImageStitch":
            assert image.size[0] > 2 * SIZE and image.size[1] == SIZE  # A | B side by side
        else:
            assert image.size == (SIZE, SIZE)
    log = server.log_tail(1 << 22)
    for node in api.values():
        if node["class_type"] == "QuantizedFluxLoader":
            assert f"QuantLoRA: loaded {node['inputs']['model_name']} as {node['inputs']['quantization']}/" in log
    if name == "flux-lora-ab-compare":  # the two branches differ by their LoRA only
        a, b = (images[nid] for nid, n in api.items() if n["_meta"]["title"] in ("Save A", "Save B"))
        assert a.tobytes() != b.tobytes()
    if name == "flux-fp8-compile-lora-hotswap":  # the hot-swap: the other LoRA on the same compiled model
        overrides = {**small(api, tag + "-swap"), "LoRA.lora_name": demo_loras[1]}
        swapped = run_workflow(server.url, api, overrides=overrides, out_dir=None, timeout=300)
        loader = next(nid for nid, n in api.items() if n["class_type"] == "QuantizedFluxLoader")
        assert loader in cached_nodes(swapped)  # the compiled model is not loaded again
        (after,) = check_saved(server, api, swapped, tag + "-swap").values()
        (before,) = images.values()
        assert after.tobytes() != before.tobytes()


def test_templates_have_titles_and_distinct_thumbnails():
    """Each example has a title and a one-line description (web/templates.json, shown on its card by
    web/templates.js) and a thumbnail of its own; each opens at a zoom where node text is drawn."""
    from PIL import Image, ImageChops

    meta = json.load(open(os.path.join(os.path.dirname(EXAMPLES), "web", "templates.json")))
    assert set(meta) == set(NAMES)
    for name, info in meta.items():
        assert info["title"].strip() and info["title"] != name
        assert info["description"].strip() and "\n" not in info["description"]
        assert read(name)["extra"]["ds"]["scale"] >= 0.75, name
    thumbs = {n: Image.open(os.path.join(EXAMPLES, f"{n}.jpg")).convert("RGB").resize((64, 48)) for n in NAMES}
    for a in NAMES:
        for b in NAMES:
            if a < b:
                diff = ImageChops.difference(thumbs[a], thumbs[b]).getdata()
                assert sum(map(sum, diff)) / (64 * 48 * 3) > 4, f"{a} and {b} have near-identical thumbnails"
