"""How fast can N GiB of host memory become page-locked? (issue 12: the first merge takes the pristine
copy into one newly locked buffer, ~4 s of a 22 s restart.) Times, for one buffer of --gib:
  register:        torch.empty + cudaHostRegister (what memory/pinned.py does today)
  touch+register:  the pages faulted in first by torch's threaded fill, then registered
  chunks:          registered in --chunks pieces from as many threads (untouched / touched)
  hostalloc:       torch.empty(pin_memory=True) (cudaHostAlloc)
and for each, a device-to-host copy of the whole buffer (is it really locked?).
Rows: results-pin.json under --out."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _env  # noqa: E402  (the import log the bench tests read)


def register(ptr, n):
    err = torch.cuda.cudart().cudaHostRegister(ptr, n, 0)
    return int(getattr(err, "value", err)) == 0


def unregister(ptr):
    torch.cuda.cudart().cudaHostUnregister(ptr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    _env.setup(cpu=a.device == "cpu")
    rows = []
    n = int(a.gib * 2**30)
    cuda = a.device == "cuda" and torch.cuda.is_available()
    src = torch.empty(n, dtype=torch.uint8, device="cuda" if cuda else "cpu")

    def d2h(buf):
        if not cuda:
            return None
        torch.cuda.synchronize()
        t = time.perf_counter()
        buf.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return round(n / (time.perf_counter() - t) / 1e9, 1)

    def row(variant, **r):
        rows.append(dict(variant=f"pin {a.gib:g} GiB: {variant}", threads=torch.get_num_threads(), **r))
        print(json.dumps(rows[-1]), flush=True)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results-pin.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "date": datetime.date.today().isoformat(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)

    def whole(touch):
        t = time.perf_counter()
        buf = torch.empty(n, dtype=torch.uint8)
        if touch:
            buf.zero_()
        t1 = time.perf_counter()
        ok = register(buf.data_ptr(), n) if cuda else False
        t2 = time.perf_counter()
        row(("touch+" if touch else "") + "register", seconds=round(t2 - t, 3), touch_s=round(t1 - t, 3),
            register_s=round(t2 - t1, 3), locked=ok, d2h_gb_s=d2h(buf))
        if ok:
            unregister(buf.data_ptr())

    def chunks(touch):
        t = time.perf_counter()
        buf = torch.empty(n, dtype=torch.uint8)
        step = -(-n // a.chunks)
        step = -(-step // 4096) * 4096
        spans = [(o, min(step, n - o)) for o in range(0, n, step)]

        def one(span):
            o, m = span
            if touch:
                buf[o:o + m].zero_()
            return register(buf.data_ptr() + o, m) if cuda else False

        with ThreadPoolExecutor(len(spans)) as ex:
            oks = list(ex.map(one, spans))
        dt = time.perf_counter() - t
        # a copy must stay inside one registration to run at the locked rate: time one chunk's copy
        rate = None
        if cuda and all(oks):
            c = buf[:spans[0][1]]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            c.copy_(src[:spans[0][1]], non_blocking=True)
            torch.cuda.synchronize()
            rate = round(spans[0][1] / (time.perf_counter() - t0) / 1e9, 1)
        row(f"{len(spans)} chunks from {len(spans)} threads" + (", touched in them" if touch else ""),
            seconds=round(dt, 3), locked=all(oks), d2h_gb_s_one_chunk=rate)
        if cuda:
            for (o, m), ok in zip(spans, oks):
                if ok:
                    unregister(buf.data_ptr() + o)

    def hostalloc():
        if not cuda:
            return
        t = time.perf_counter()
        buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        row("torch.empty(pin_memory=True)", seconds=round(time.perf_counter() - t, 3), locked=True, d2h_gb_s=d2h(buf))
        del buf

    def huge(touch):
        import mmap

        t = time.perf_counter()
        mm_ = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mm_.madvise(mmap.MADV_HUGEPAGE)
        buf = torch.frombuffer(mm_, dtype=torch.uint8)
        if touch:
            buf.zero_()
        t1 = time.perf_counter()
        ok = register(buf.data_ptr(), n) if cuda else False
        t2 = time.perf_counter()
        row("mmap + MADV_HUGEPAGE" + (" + threaded touch" if touch else "") + " + register", seconds=round(t2 - t, 3),
            touch_s=round(t1 - t, 3), register_s=round(t2 - t1, 3), locked=ok, d2h_gb_s=d2h(buf))
        if ok:
            unregister(buf.data_ptr())
        del buf

    for f in (lambda: huge(False), lambda: huge(True), lambda: whole(False), lambda: whole(True), lambda: chunks(False), lambda: chunks(True), hostalloc,
              lambda: whole(False)):
        try:
            f()
        except Exception as e:
            row("error", error=f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
