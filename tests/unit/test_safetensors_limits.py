"""Layer 1 (no ComfyUI): hostile safetensors headers get a named error, in bounded time and memory.
Issue 11: 'Infinity' in offsets or shapes escaped as OverflowError without the file's name, and a
LoRA header with a million entries took 33-37 s and ~1.2 GB before its (correct) error."""
import json
import struct
import time

import pytest

from quantlora.errors import QuantLoRAError
from quantlora.checkpoint.safetensors_io import load_state_dict, read_header


def write_raw(path, header_text: str, data: bytes = b"\0" * 16):
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.mark.parametrize("entry", [
    '{"dtype": "F32", "shape": [2], "data_offsets": [0, Infinity]}',
    '{"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}',
    '{"dtype": "F32", "shape": [2], "data_offsets": [0, 1e400]}',
    '{"dtype": "F32", "shape": [-Infinity], "data_offsets": [0, 8]}',
    '{"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}',
])
@pytest.mark.parametrize("reader", [read_header, load_state_dict])
def test_non_finite_numbers_in_header(tmp_path, entry, reader):
    path = write_raw(tmp_path / "inf.safetensors", '{"w": %s}' % entry)
    with pytest.raises(QuantLoRAError) as e:
        reader(path)
    assert "inf.safetensors" in str(e.value) and "Re-download" in str(e.value)


def test_lora_header_with_a_million_entries_is_refused_fast(tmp_path):
    entries = ",".join('"t%d": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}' % i for i in range(1_000_000))
    path = write_raw(tmp_path / "huge.safetensors", "{" + entries + "}", b"\0" * 4)
    t0 = time.perf_counter()
    with pytest.raises(QuantLoRAError) as e:
        load_state_dict(path)
    took = time.perf_counter() - t0
    assert "huge.safetensors" in str(e.value) and "MiB" in str(e.value), e.value
    assert took < 2.0, took


def test_lora_header_with_too_many_small_entries(tmp_path):
    entries = ",".join('"t%d":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}' % i for i in range(30_000))
    path = write_raw(tmp_path / "many.safetensors", "{" + entries + "}", b"\0" * 4)
    with pytest.raises(QuantLoRAError) as e:
        load_state_dict(path)
    assert "many.safetensors" in str(e.value) and "more than 20,000 tensors" in str(e.value)


def test_real_sized_headers_pass(tmp_path):
    """A LoRA on every layer of FLUX.1 (~2,500 tensors) stays far inside the bounds."""
    import torch
    from safetensors.torch import save_file

    sd = {f"lora_unet_single_blocks_{i}_linear{j}.lora_{d}.weight": torch.zeros(1, 1)
          for i in range(400) for j in range(3) for d in ("down", "up")}
    path = str(tmp_path / "ok.safetensors")
    save_file(sd, path)
    tensors, _ = load_state_dict(path)
    assert len(tensors) == len(sd)
