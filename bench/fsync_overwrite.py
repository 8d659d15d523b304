#!/usr/bin/env python3
"""fdatasync after appending to a file against after overwriting blocks it already has.

Why the embedded store's write-ahead log is recycled instead of truncated (BENCHMARKS.md):
an fdatasync that grows the file also commits the file system's journal for the new size.
Usage: python3 bench/fsync_overwrite.py [DIR] (default: the current directory).
"""
import os
import sys
import time


def run(path, overwrite, n=3000, size=8192):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        if overwrite:
            os.pwrite(fd, b"\0" * (n * size), 0)
            os.fsync(fd)
        buf = b"x" * size
        lat = []
        for i in range(n):
            t = time.perf_counter()
            os.pwrite(fd, buf, i * size)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    lat.sort()
    q = lambda p: lat[min(n - 1, int(n * p))] * 1000
    return f"p50 {q(0.5):.3f} ms, p99 {q(0.99):.3f} ms, max {lat[-1] * 1000:.3f} ms"


def main():
    path = os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".", "fsync-overwrite.tmp")
    for _ in range(2):
        print(f"bench fsync.append: 8 KiB pwrite + fdatasync growing the file: {run(path, False)}")
        print(f"bench fsync.overwrite: 8 KiB pwrite + fdatasync inside the file: {run(path, True)}")


if __name__ == "__main__":
    main()
