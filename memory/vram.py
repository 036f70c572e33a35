"""GPU and host memory numbers as plain dicts, and peak VRAM per node and per prompt.

No ComfyUI import: nodes/vram_routes.py wires this into ComfyUI's server. Everything goes
through torch's own memory API (torch.cuda.*), so CUDA and ROCm (HIP) builds are both
covered; a machine without either reports the host and says there is no GPU.

Peaks. torch keeps one resettable high-water mark per device (max_memory_allocated /
max_memory_reserved). PeakTracker splits it into windows: at each boundary (a node starts,
a node ends, the user resets) it folds torch's mark into the open accumulators (global
since the user's last reset, the running prompt, the running node) and resets torch's mark
to the current value. Reading a snapshot never resets anything. All methods are
thread-safe: boundaries come from ComfyUI's worker thread, reads and resets from the
server's event loop (through a thread).
"""
from __future__ import annotations

import threading
import time

MAX_DEVICES = 16          # bounded response size
MAX_NODES = 256           # per-node records kept for one prompt
MAX_NAME = 128
MAX_ID = 64               # prompt and node ids come from the client: cut to keep responses bounded


def _id(value):
    return value if value is None else str(value)[:MAX_ID]


def _psutil():
    try:
        import psutil
        return psutil
    except ImportError:  # ComfyUI depends on psutil; stay importable without it
        return None


class TorchSource:
    """Reads torch.cuda (CUDA or ROCm). Every call is cheap: allocator counters and one
    cudaMemGetInfo per device, no synchronisation, no allocation."""

    def __init__(self):
        import torch
        self.torch = torch

    def backend(self) -> str:
        t = self.torch
        if not t.cuda.is_available():
            return "none"
        return "rocm" if getattr(t.version, "hip", None) else "cuda"

    def no_gpu_reason(self) -> str | None:
        t = self.torch
        if t.cuda.is_available():
            return None
        if getattr(t.version, "cuda", None) or getattr(t.version, "hip", None):
            return "no GPU: torch was built with GPU support but sees no device"
        return "no GPU: this torch build has no CUDA or ROCm support"

    def device_count(self) -> int:
        t = self.torch
        return min(t.cuda.device_count(), MAX_DEVICES) if t.cuda.is_available() else 0

    def device(self, i: int) -> dict:
        c = self.torch.cuda
        props = c.get_device_properties(i)
        total = int(props.total_memory)
        free = self._free(i, total)
        return {
            "index": i,
            "name": str(props.name)[:MAX_NAME],
            "total": total,
            "free": free,
            "used": None if free is None else max(total - free, 0),
            "allocated": int(c.memory_allocated(i)),
            "reserved": int(c.memory_reserved(i)),
        }

    def _free(self, i: int, total: int) -> int | None:
        # cudaMemGetInfo creates a CUDA context on a device that has none (hundreds of MB,
        # on a GPU ComfyUI may not use): only ask devices torch already works on. Others go
        # through NVML/amdsmi when available, else free is unknown.
        c = self.torch.cuda
        if c.is_initialized() and (i == c.current_device() or c.memory_reserved(i) > 0):
            return int(c.mem_get_info(i)[0])
        try:
            return max(total - int(c.device_memory_used(i)), 0)
        except Exception:
            return None

    def max_marks(self) -> dict[int, tuple[int, int]]:
        c = self.torch.cuda
        return {i: (int(c.max_memory_allocated(i)), int(c.max_memory_reserved(i)))
                for i in range(self.device_count())}

    def reset_marks(self) -> None:
        c = self.torch.cuda
        for i in range(self.device_count()):
            c.reset_peak_memory_stats(i)

    def host(self) -> dict:
        ps = _psutil()
        if ps is None:
            return {"total": None, "available": None, "used": None, "percent": None, "process_rss": None}
        vm = ps.virtual_memory()
        try:
            rss = int(ps.Process().memory_info().rss)
        except Exception:
            rss = None
        return {"total": int(vm.total), "available": int(vm.available), "used": int(vm.total - vm.available),
                "percent": float(vm.percent), "process_rss": rss}


def _max_into(acc: dict, marks: dict) -> None:
    for i, (a, r) in marks.items():
        pa, pr = acc.get(i, (0, 0))
        acc[i] = (max(pa, a), max(pr, r))


def _summary(acc: dict) -> dict:
    """Per-device peaks plus the largest of them (the number a badge shows)."""
    devs = [{"index": i, "peak_allocated": a, "peak_reserved": r} for i, (a, r) in sorted(acc.items())]
    return {"peak_allocated": max((d["peak_allocated"] for d in devs), default=0),
            "peak_reserved": max((d["peak_reserved"] for d in devs), default=0),
            "devices": devs}


class PeakTracker:
    def __init__(self, source=None, clock=time.time):
        self.source = source if source is not None else TorchSource()
        self.clock = clock
        self._lock = threading.RLock()
        self._global: dict = {}
        self.reset_at = clock()
        self._prompt = None      # dict while a prompt runs, then the last prompt's record
        self._node = None        # (node, display_node, started, acc) while a node runs

    # -- windows --
    def _fold(self) -> None:
        marks = self.source.max_marks()
        _max_into(self._global, marks)
        if self._prompt is not None and self._prompt["running"]:
            _max_into(self._prompt["acc"], marks)
        if self._node is not None:
            _max_into(self._node[3], marks)
        self.source.reset_marks()

    def reset(self) -> None:
        """The user's reset: the global peak restarts from the current usage. A running
        prompt/node keeps what it has reached so far."""
        with self._lock:
            self._fold()
            self._global = {}
            _max_into(self._global, self.source.max_marks())
            self.reset_at = self.clock()

    def begin_prompt(self, prompt_id) -> list[tuple[str, dict]]:
        """Returns ("node"|"prompt", record) pairs for anything left open (normally none)."""
        with self._lock:
            out = self._close(status="superseded") if self._prompt and self._prompt["running"] else []
            self._fold()
            acc = {}
            _max_into(acc, self.source.max_marks())
            self._prompt = {"prompt_id": _id(prompt_id), "running": True, "started": self.clock(), "acc": acc,
                            "nodes": {}, "status": None}
            return out

    def begin_node(self, node, display_node=None, prompt_id=None) -> dict | None:
        """A node starts executing; returns the record of the node it ends, if any."""
        with self._lock:
            if self._prompt is None or not self._prompt["running"]:
                self.begin_prompt(prompt_id)
            done = self._end_node()
            acc = {}
            _max_into(acc, self.source.max_marks())
            node = _id(node)
            self._node = (node, _id(display_node) if display_node is not None else node, self.clock(), acc)
            return done

    def end_node(self) -> dict | None:
        with self._lock:
            return self._end_node()

    def _end_node(self) -> dict | None:
        if self._node is None:
            return None
        self._fold()
        node, display, started, acc = self._node
        self._node = None
        rec = {"prompt_id": self._prompt["prompt_id"] if self._prompt else None, "node": node,
               "display_node": display, "gpu": self.source.device_count() > 0,
               "seconds": round(self.clock() - started, 4), **_summary(acc),
               "host_rss": self.source.host().get("process_rss")}
        if self._prompt is not None:
            nodes = self._prompt["nodes"]
            if node in nodes or len(nodes) < MAX_NODES:
                nodes[node] = {"peak_allocated": rec["peak_allocated"], "peak_reserved": rec["peak_reserved"]}
        return rec

    def end_prompt(self, status: str = "success") -> list[tuple[str, dict]]:
        """Returns [("node", last node)?, ("prompt", record)], or [] when no prompt was running."""
        with self._lock:
            if self._prompt is None or not self._prompt["running"]:
                return []
            return self._close(status)

    def _close(self, status: str) -> list[tuple[str, dict]]:
        out = []
        rec = self._end_node()
        if rec is not None:
            out.append(("node", rec))
        self._fold()
        p = self._prompt
        p["running"], p["status"], p["seconds"] = False, status, round(self.clock() - p["started"], 4)
        out.append(("prompt", self.prompt_record()))
        return out

    def running(self) -> bool:
        with self._lock:
            return bool(self._prompt and self._prompt["running"])

    def prompt_record(self) -> dict | None:
        with self._lock:
            p = self._prompt
            if p is None:
                return None
            acc = dict(p["acc"])
            if p["running"]:  # include what torch has seen since the last fold, without resetting
                _max_into(acc, self.source.max_marks())
            return {"prompt_id": p["prompt_id"], "running": p["running"], "status": p["status"],
                    "node": self._node[0] if self._node else None, "gpu": self.source.device_count() > 0,
                    **_summary(acc), "nodes": dict(p["nodes"])}

    def global_peaks(self) -> dict:
        with self._lock:
            acc = dict(self._global)
            _max_into(acc, self.source.max_marks())
            return acc


def snapshot(tracker: PeakTracker) -> dict:
    """The JSON the route returns and the periodic event carries."""
    src = tracker.source
    n = src.device_count()
    peaks = tracker.global_peaks()
    devices = []
    for i in range(n):
        d = src.device(i)
        d["peak_allocated"], d["peak_reserved"] = peaks.get(i, (d["allocated"], d["reserved"]))
        devices.append(d)
    return {
        "version": 1,
        "time": round(tracker.clock(), 3),
        "backend": src.backend(),
        "gpu": n > 0,
        "message": None if n else src.no_gpu_reason(),
        "devices": devices,
        "host": src.host(),
        "peak_reset_at": round(tracker.reset_at, 3),
        "prompt": tracker.prompt_record(),
    }
