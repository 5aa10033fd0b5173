#!/usr/bin/python3
"""Crash-consistency writer and checker over NBD, with libnbd.

Every block this writes holds a self-describing version: 16 bytes of
(block number, sequence number), then bytes derived from both, so a block
read back is either all zeroes (never written), or one exact version of
one write: anything else is torn or misplaced.

  crash_io.py write URI LOG FIRST_SEQ FIRST_BLOCK BLOCKS SEED
      4 KiB random writes at queue depth 32 to blocks
      [FIRST_BLOCK, FIRST_BLOCK + BLOCKS) until the server goes away; each
      acknowledged write is appended to LOG as "block seq" and flushed at
      once; each issued one as "issued block seq" before it is sent.
  crash_io.py check URI LOG FIRST_BLOCK BLOCKS
      reads the whole export in 1 MiB requests (every read must succeed),
      then checks every block of the range against LOG: it holds the last
      acknowledged version or a later issued one, never an older one, never
      a torn or foreign one. Prints one line of counts; exits 1 on any
      failure.
"""
import struct
import sys
import random

import nbd

BS = 4096
QD = 32


def version(block, seq):
    head = struct.pack("<QQ", block, seq)
    x = (block * 0x9E3779B97F4A7C15 + seq * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF
    body = bytearray()
    while len(body) < BS - len(head):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        body += struct.pack("<Q", x)
    return head + bytes(body[: BS - len(head)])


def write(uri, log, first_seq, first_block, blocks, seed):
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    out = open(log, "a", buffering=1)
    seq = first_seq
    inflight = {}
    try:
        while True:
            while len(inflight) < QD:
                block = first_block + rnd.randrange(blocks)
                out.write(f"issued {block} {seq}\n")
                buf = version(block, seq)
                c = h.aio_pwrite(buf, block * BS)
                inflight[c] = (block, seq, buf)
                seq += 1
            h.poll(-1)
            for c in list(inflight):
                if h.aio_command_completed(c):
                    block, s, _ = inflight.pop(c)
                    out.write(f"{block} {s}\n")
    except nbd.Error:
        pass
    out.close()


def check(uri, log, first_block, blocks):
    acked = {}
    issued = {}
    with open(log) as f:
        for line in f:
            p = line.split()
            if p[0] == "issued":
                b, s = int(p[1]), int(p[2])
                issued.setdefault(b, set()).add(s)
            else:
                b, s = int(p[0]), int(p[1])
                acked[b] = max(acked.get(b, -1), s)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    read_errors = 0
    data = bytearray(size)
    for off in range(0, size, 1 << 20):
        n = min(1 << 20, size - off)
        try:
            data[off : off + n] = h.pread(n, off)
        except nbd.Error as e:
            read_errors += 1
            print(f"read error at {off}: {e}", file=sys.stderr)
    lost = torn = 0
    for b in range(first_block, first_block + blocks):
        got = bytes(data[b * BS : (b + 1) * BS])
        want = acked.get(b, -1)
        if got == bytes(BS):
            if want >= 0:
                lost += 1
                print(f"block {b}: zeroes, but seq {want} was acknowledged", file=sys.stderr)
            continue
        blk, s = struct.unpack("<QQ", got[:16])
        if blk != b or s not in issued.get(b, ()) or got != version(b, s):
            torn += 1
            print(f"block {b}: not a version written there (says {blk}/{s})", file=sys.stderr)
        elif s < want:
            lost += 1
            print(f"block {b}: seq {s}, but seq {want} was acknowledged", file=sys.stderr)
    print(f"acked-blocks={len(acked)} read-errors={read_errors} lost={lost} torn={torn}")
    h.shutdown()
    return 1 if read_errors or lost or torn else 0


if __name__ == "__main__":
    a = sys.argv
    if a[1] == "write":
        write(a[2], a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]))
    else:
        sys.exit(check(a[2], a[3], int(a[4]), int(a[5])))
