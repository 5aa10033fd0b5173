#!/usr/bin/env bash
# Side-by-side benchmark: quorum serve against QEMU's quorum driver
# (qemu-storage-daemon) on the same images, same clients, one run.
# Wraps shared/bench/bench_vs_qemu.sh; extra arguments go to it
# (e.g. -r 5, -m "seqread randread32", -c "nbdcopy qemu-img").
# Environment: SHARED (default ../shared beside the checkout), SIZE_MIB, REPS...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
shared=${SHARED:-$root/../shared}
harness=$shared/bench/bench_vs_qemu.sh
[ -x "$harness" ] || [ -f "$harness" ] || { echo "missing $harness" >&2; exit 2; }
(cd "$root" && cargo build --release -q -p quorum)
export QUORUM_BIN=$root/target/release/quorum
t="$here/quorum-target.sh"
exec bash "$harness" \
  -t "${TARGETS:-qemu-quorum-raw qemu-quorum-raw-best qemu-quorum-degraded qemu-single-raw quorum-raw quorum-degraded}" \
  --ref "${REF:-qemu-quorum-raw}" \
  --daemon quorum-raw "$t raw @IMG@ @SOCK@ @EXPORT@" \
  --daemon quorum-qcow2 "$t qcow2 @IMG@ @SOCK@ @EXPORT@" \
  --daemon quorum-fifo "$t fifo @IMG@ @SOCK@ @EXPORT@" \
  --daemon quorum-degraded "$t degraded @IMG@ @SOCK@ @EXPORT@" \
  "$@"
