"""Layer 3: QuantizedFluxLoader in a real ComfyUI server, driven through /prompt."""
import io

import pytest
from PIL import Image

from graphs import loader, txt2img
from harness.server import execution_error
from quantlora.tools.demo_models import DEMO_FLUX

pytestmark = pytest.mark.server


def test_object_info_lists_loader(server):
    info = server.object_info("QuantizedFluxLoader")
    req = info["input"]["required"]
    assert DEMO_FLUX in req["model_name"][0] or DEMO_FLUX in req["model_name"][1].get("options", [])
    quant = req["quantization"]
    options = quant[0] if isinstance(quant[0], list) else quant[1]["options"]
    assert {"none", "bnb-nf4", "torchao-int8-weight-only", "quanto-int4"} <= set(options)
    assert info["output"] == ["MODEL"]


def test_txt2img_with_stock_ksampler_saves_image(server):
    entry = server.run(txt2img(loader(), prefix="loader-e2e"))
    assert execution_error(entry) is None, execution_error(entry)
    images = entry["outputs"]["save"]["images"]
    png = Image.open(io.BytesIO(server.view(images[0])))
    assert png.size == (64, 64)
    assert len(set(png.getdata())) > 10  # a real decoded image, not a constant fill


def _pixels(server, entry):
    return list(Image.open(io.BytesIO(server.view(entry["outputs"]["save"]["images"][0]))).getdata())


def test_weight_cache_written_then_read_gives_the_same_image(server):
    """weight_cache on: the first load writes models/quantlora_cache/, the next load of the file reads
    it (a changed attention input makes ComfyUI run the loader again) and samples the same image."""
    import os

    cache_dir = os.path.join(server.base, "models", "quantlora_cache")
    plain = loader(quantization="torchao-int8-weight-only")
    cached = loader(quantization="torchao-int8-weight-only")
    cached["model"]["inputs"].update(weight_cache="on", attention="auto")
    e0 = server.run(txt2img(plain, prefix="wcache-off"))
    assert execution_error(e0) is None, execution_error(e0)
    e1 = server.run(txt2img(cached, prefix="wcache-write"))
    assert execution_error(e1) is None, execution_error(e1)
    files = [f for f in os.listdir(cache_dir) if f.endswith(".safetensors")]
    assert len(files) == 1 and "torchao-int8-weight-only" in files[0], files
    cached["model"]["inputs"]["attention"] = "default"
    e2 = server.run(txt2img(cached, prefix="wcache-read"))
    assert execution_error(e2) is None, execution_error(e2)
    log = server.log_tail(200_000)
    assert "written to the weight cache" in log and "read from the weight cache" in log, log[-3000:]
    assert _pixels(server, e0) == _pixels(server, e1) == _pixels(server, e2)


def test_loader_starts_first_and_loads_while_the_text_encoder_runs(server, tmp_path):
    """QuantizedFluxLoader's execute is async (nodes/load_overlap.py): ComfyUI starts it before the other
    ready nodes and goes on with the text encoder while it loads."""
    import uuid

    from quantlora.client import run_workflow

    graph = txt2img(loader(), prefix="overlap")
    graph["model"]["inputs"]["lora_max_rank"] = 3  # inputs no earlier test used: the loader runs, not its cache
    graph["pos"]["inputs"]["text"] = f"a red fox in the snow {uuid.uuid4().hex[:8]}"
    events = []
    result = run_workflow(server.url, graph, out_dir=tmp_path / "out", timeout=600, progress=events.append)
    assert len(result.outputs) == 1
    executing = [str(e.node) for e in events if e.kind == "executing"]
    assert executing.index("model") < executing.index("pos"), executing  # the text is new: it runs too
    log = server.log_tail(200_000)
    assert "while ComfyUI runs the graph's other nodes" in log, log[-3000:]
