#!/usr/bin/env bash
# Start `quorum serve` over the harness's images, for bench_vs_qemu.sh.
# usage: quorum-target.sh KIND IMG SOCK EXPORT
#   KIND: raw (r1..r3.raw), qcow2 (r1..r3.qcow2), fifo (raw, read_pattern=fifo),
#         degraded (r1.raw r2.raw bad.raw: every read has one dissenter)
# The harness shares images between daemons (QEMU runs with locking=off), so
# quorum runs with --no-locking too.
set -euo pipefail
kind=$1 img=$2 sock=$3 export=$4
bin=${QUORUM_BIN:-$(dirname "$0")/../target/release/quorum}
xml=$(dirname "$sock")/quorum-$kind.xml
fmt=raw pattern=quorum files="r1.raw r2.raw r3.raw" extra=""
case $kind in
  raw) ;;
  qcow2) fmt=qcow2 files="r1.qcow2 r2.qcow2 r3.qcow2" ;;
  fifo) pattern=fifo ;;
  degraded) files="r1.raw r2.raw bad.raw" extra=--read-only ;;
  *) echo "unknown kind $kind" >&2; exit 2 ;;
esac
{
  echo "<disk type='quorum' device='disk'>"
  echo "  <driver name='qemu' type='quorum' read_pattern='$pattern'/>"
  echo "  <threshold value='2'/>"
  for f in $files; do
    echo "  <backingStore type='file'><format type='$fmt'/><source file='$img/$f'/></backingStore>"
  done
  echo "  <target dev='vda' bus='virtio'/>"
  echo "</disk>"
} > "$xml"
exec "$bin" serve "$xml" --socket "$sock" --export "$export" --no-locking $extra
