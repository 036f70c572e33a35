"""Layer 3: txt2img through a real ComfyUI server with each quantization that runs on CPU."""
import io

import pytest
from PIL import Image

from graphs import loader, txt2img
from harness.server import execution_error
from quantlora.tools.demo_models import DEMO_FLUX

pytestmark = pytest.mark.server

# The tiny demo Flux has hidden size 64, so every Linear's input width suits NF4 (multiple of 64).
QUANTIZATIONS = ["bnb-nf4", "bnb-int8", "torchao-int8-weight-only", "torchao-fp8-weight-only", "quanto-int8"]


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_txt2img_quantized_saves_image(server, quantization):
    entry = server.run(txt2img(loader(quantization=quantization), seed=7, prefix=f"quantized-{quantization}"))
    assert execution_error(entry) is None, execution_error(entry)
    assert f"QuantLoRA: loaded {DEMO_FLUX} as {quantization}/" in server.log_tail(1 << 22)
    images = entry["outputs"]["save"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith(f"quantized-{quantization}")
    png = Image.open(io.BytesIO(server.view(images[0])))
    assert png.size == (64, 64)
    assert len(set(png.getdata())) > 10  # a decoded image, not a constant fill
