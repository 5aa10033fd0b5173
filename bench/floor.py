#!/usr/bin/env python3
"""The least CPU any quorum daemon can spend per 1 MiB request here.

A write to 3 replicas is its payload received from the socket, then 3
copies into page cache; a voted read is 3 copies out of it (plus 2
compares, about 45 us per MiB here, not timed). This times
exactly those copies, with no protocol, on 3 files in a tmpfs, so benchmark
ratios can be read against it.

usage: taskset -c 1 bench/floor.py [DIR] [SIZE_MIB]   (DIR default /dev/shm)
"""
import mmap
import os
import socket
import sys
import time

MIB = 1 << 20


def cpu_per_mib(size_mib, op):
    start = time.process_time()
    for i in range(size_mib):
        op(i * MIB)
    return (time.process_time() - start) / size_mib * 1e6


def recv_cpu_per_mib(size_mib, buf):
    """CPU this process spends receiving 1 MiB from a unix stream socket
    (what an NBD daemon does for every write's payload before it can copy
    it anywhere); a forked sender, on another CPU when there is one,
    writes it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            cpus = os.sched_getaffinity(0)
            other = sorted(set(range(os.cpu_count() or 1)) - cpus)
            if other:
                os.sched_setaffinity(0, {other[0]})
            chunk = bytes([0x5A]) * MIB
            for _ in range(size_mib):
                b.sendall(chunk)
        finally:
            os._exit(0)
    b.close()
    view = memoryview(buf)
    start = time.process_time()
    for _ in range(size_mib):
        got = 0
        while got < MIB:
            n = a.recv_into(view[got:], MIB - got)
            if n == 0:
                raise RuntimeError("sender ended early")
            got += n
    spent = time.process_time() - start
    a.close()
    os.waitpid(pid, 0)
    return spent / size_mib * 1e6


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else "/dev/shm"
    size_mib = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    paths = [os.path.join(where, f"floor-r{i}.raw") for i in range(3)]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
    try:
        # Page-aligned buffers (mmap), as the daemon uses: a misaligned
        # source or target makes each 1 MiB copy measurably slower.
        data = mmap.mmap(-1, MIB)
        data.write(bytes([0xA5]) * MIB)
        bufs = [mmap.mmap(-1, MIB) for _ in fds]

        def write3(off):
            for fd in fds:
                os.pwrite(fd, data, off)

        def read3(off):
            for fd, b in zip(fds, bufs):
                os.preadv(fd, [b], off)

        write3_first = cpu_per_mib(size_mib, write3)  # allocates the pages
        rows = []
        for _ in range(3):
            rows.append((cpu_per_mib(size_mib, write3), cpu_per_mib(size_mib, read3)))
        w = sorted(r[0] for r in rows)[1]
        r = sorted(r[1] for r in rows)[1]
        print(f"first write pass (allocating): {write3_first:.0f} us CPU per MiB")
        print(f"3x pwrite 1 MiB, pages present: {w:.0f} us CPU per MiB (median of 3)")
        print(f"3x pread 1 MiB:                  {r:.0f} us CPU per MiB (median of 3)")
        recv = sorted(recv_cpu_per_mib(size_mib, bufs[0]) for _ in range(3))[1]
        print(f"recv 1 MiB from a unix socket:   {recv:.0f} us CPU per MiB (median of 3)")
        print(f"write floor (recv + 3x pwrite):  {recv + w:.0f} us CPU per MiB")
    finally:
        for fd, p in zip(fds, paths):
            os.close(fd)
            os.unlink(p)


if __name__ == "__main__":
    main()
