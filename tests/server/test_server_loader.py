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
