"""Drops files from the OS page cache (posix_fadvise DONTNEED after fsync; no root needed), so the next
process reads them from the disk: a restart after the machine's memory went to something else, or a
host whose RAM cannot keep a 22 GiB checkpoint cached. Usage: python bench/evict.py FILE_OR_DIR..."""
import os
import sys


def files(paths):
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                yield from (os.path.join(root, n) for n in names if n.endswith(".safetensors"))
        elif os.path.isfile(p):
            yield p


def main():
    total = 0
    for f in files(sys.argv[1:]):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    print(f"[evict] {total / 2**30:.1f} GiB dropped from the page cache")


if __name__ == "__main__":
    main()
