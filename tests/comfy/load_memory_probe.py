"""Run in a subprocess by test_load_memory.py: load a checkpoint with the pack's loader while a
thread samples this process's anonymous resident memory (RssAnon: the page cache of the memory-mapped
file is reclaimable and not counted). Prints JSON {baseline, peak, file_bytes}."""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest
import conftest  # noqa: E402  (registers the pack, imports ComfyUI in --cpu mode)

conftest.import_comfy()


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def main(path, quantization, dtype):
    from quantlora.nodes.bridge import load_flux_model_patcher

    import gc
    gc.collect()
    baseline, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    patcher, report = load_flux_model_patcher(path, quantization, dtype)
    done.set()
    t.join()
    peak[0] = max(peak[0], rss_anon())
    print(json.dumps({"baseline": baseline, "peak": peak[0], "file_bytes": os.path.getsize(path),
                      "weights_bytes": report.weights_bytes}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
