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
    ap.add_argument("--map", default="", help="instead: map this file and lock its page-cache pages (memory/pinned_file.py)")
    ap.add_argument("--map-gib", type=float, default=0.0, help="instead: the same on a file of this size written in --workdir")
    ap.add_argument("--workdir", default="/tmp/quantlora-pin")
    a = ap.parse_args()
    _env.setup(cpu=a.device == "cpu")
    rows = []
    n = int(a.gib * 2**30)
    cuda = a.device == "cuda" and torch.cuda.is_available()
    src = torch.empty(0 if a.map or a.map_gib else n, dtype=torch.uint8, device="cuda" if cuda else "cpu")

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

    if a.map or a.map_gib:
        return map_probe(a, cuda, row)
    for f in (lambda: huge(False), lambda: huge(True), lambda: whole(False), lambda: whole(True), lambda: chunks(False), lambda: chunks(True), hostalloc,
              lambda: whole(False)):
        try:
            f()
        except Exception as e:
            row("error", error=f"{type(e).__name__}: {e}")


def map_probe(a, cuda, row):
    """A file mapped read-only and its page-cache pages locked in place (what the loader does with the
    weight cache): how long locking takes, the host-to-device rate from those pages against an
    anonymous page-locked buffer, a second mapping of the same file locked too (two models of one
    checkpoint, two ComfyUI processes on one host), and unlocking."""
    from quantlora.memory.pinned_file import PinnedFile

    path = a.map
    if not path:
        os.makedirs(a.workdir, exist_ok=True)
        path = os.path.join(a.workdir, "map-probe.bin")
        n = int(a.map_gib * 2**30)
        with open(path, "wb") as f:
            block = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8).numpy().tobytes()
            for o in range(0, n, len(block)):
                f.write(block[:min(len(block), n - o)])
    size = os.path.getsize(path)
    a.gib = round(size / 2**30, 2)  # the rows' label
    t = time.perf_counter()
    first = PinnedFile(path, lock=cuda)
    ready = first.ready(0, size) and first.locked
    row("file mapped, page cache locked", gib=round(size / 2**30, 3), seconds=round(time.perf_counter() - t, 3),
        locked=ready, **{k: v for k, v in first.describe().items() if k in ("pieces", "locked_gib", "failed", "register_s")})
    sample = min(size, 2 << 30)
    if cuda and ready:
        dst = torch.empty(size, dtype=torch.uint8, device="cuda")

        def h2d(copy, nbytes):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            return round(nbytes / (time.perf_counter() - t0) / 1e9, 1)

        whole = h2d(lambda: first.copy_to(dst, 0), size)
        part = h2d(lambda: first.copy_to(dst[:sample], 0), sample)
        anon = torch.empty(sample, dtype=torch.uint8, pin_memory=True)
        anon_rate = h2d(lambda: dst[:sample].copy_(anon, non_blocking=True), sample)
        row("host-to-device from the locked page cache", gb_s_whole=whole, gb_s_2gib=part, gb_s_2gib_anonymous_pinned=anon_rate)
        t = time.perf_counter()
        second = PinnedFile(path, lock=True)
        again = second.ready(0, size)
        same = None
        if again:  # (dst's first 2 GiB were overwritten by the anonymous buffer's copy: copy them again)
            other, ref = (torch.empty(sample, dtype=torch.uint8, device="cuda") for _ in range(2))
            second.copy_to(other, 0)
            first.copy_to(ref, 0)
            same = bool(torch.equal(other, ref))
        row("the same file mapped and locked a second time", seconds=round(time.perf_counter() - t, 3), locked=again,
            failed=second.failed, same_bytes=same)
        t = time.perf_counter()
        second.unlock()
        first.unlock()
        row("both unlocked", seconds=round(time.perf_counter() - t, 3))
    else:
        out = torch.empty(sample, dtype=torch.uint8)
        row("copied from the mapping (not locked)", copied=first.copy_to(out, 0) if not first.locked else False)
        first.unlock()


if __name__ == "__main__":
    main()
