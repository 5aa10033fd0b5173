"""Drive quorum's monitor with qemu.qmp's QMPClient, as QEMU users do.

usage: qmp_events.py SOCKET NBD_URI REPLICA_FILE OFFSET

Connects and negotiates, runs query-quorum and an unknown command, then
listens for QUORUM_REPORT_BAD while it corrupts REPLICA_FILE at OFFSET
(4 KiB of 0xff, behind the daemon's back) and qemu-io reads that block
through the export. Prints one JSON object with what it saw; exits 1 if
any step fails (the Rust test asserts the details).
"""

import asyncio
import json
import os
import subprocess
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main() -> dict:
    sock, uri, replica, offset = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    qmp = QMPClient("quorum-test")
    await asyncio.wait_for(qmp.connect(sock), 30)
    out = {}
    out["query-quorum"] = await asyncio.wait_for(qmp.execute("query-quorum"), 30)
    try:
        await qmp.execute("no-such-command")
        out["unknown"] = None
    except ExecuteError as e:
        out["unknown"] = e.error_class
    with qmp.listener(("QUORUM_REPORT_BAD",)) as listener:
        fd = os.open(replica, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * 4096, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        io = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"read {offset} 4096", uri],
            capture_output=True, text=True, timeout=60,
        )
        out["qemu-io"] = {"code": io.returncode, "output": io.stdout + io.stderr}
        event = await asyncio.wait_for(listener.get(), 30)
        out["event"] = dict(event)
    await qmp.disconnect()
    return out


if __name__ == "__main__":
    # qemu.qmp's Message is a Mapping: dict() makes it JSON.
    print(json.dumps(asyncio.run(main()), default=dict))
