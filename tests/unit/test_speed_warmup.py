"""speed/warmup.py (layer 1): Triton's cache key is computed once, in a background thread, for CUDA
loads only, and not at all with QUANTLORA_WARMUP=0; a failure there is kept, never raised."""
import threading

import pytest
import torch

from quantlora.speed import warmup


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(warmup, "_thread", None)
    monkeypatch.setattr(warmup, "stats", {})
    calls = []
    done = threading.Event()

    def key():
        calls.append(threading.current_thread().name)
        done.set()
        return "k"

    monkeypatch.setattr(warmup, "_triton_key", lambda: key)
    return calls, done


def test_runs_once_in_the_background_for_cuda(fresh):
    calls, done = fresh
    assert not warmup.start(torch.device("cpu"))
    assert warmup.start(torch.device("cuda", 0))
    assert not warmup.start(torch.device("cuda", 0))  # once per process
    assert done.wait(10)
    warmup._thread.join(10)
    assert calls == ["quantlora-warmup"] and warmup.stats["triton_key_s"] >= 0


def test_off_by_environment(fresh, monkeypatch):
    calls, _ = fresh
    monkeypatch.setenv("QUANTLORA_WARMUP", "0")
    assert not warmup.start(torch.device("cuda")) and calls == []


def test_a_failure_is_kept_not_raised(monkeypatch):
    monkeypatch.setattr(warmup, "_thread", None)
    monkeypatch.setattr(warmup, "stats", {})

    def broken():
        raise RuntimeError("no libtriton")

    monkeypatch.setattr(warmup, "_triton_key", lambda: broken)
    assert warmup.start(torch.device("cuda"))
    warmup._thread.join(10)
    assert "no libtriton" in warmup.stats["error"]


def test_no_triton_no_thread(monkeypatch):
    monkeypatch.setattr(warmup, "_thread", None)
    monkeypatch.setattr(warmup, "_triton_key", lambda: None)
    assert not warmup.start(torch.device("cuda"))
