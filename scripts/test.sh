#!/usr/bin/env bash
# Runs the whole test suite. Installs the Debian test peers first when any is
# missing (needs root or sudo). README and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
            qemu-storage-daemon:qemu-utils \
            nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdkit:nbdkit fio:fio; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
# nbdsh is a python module on Debian's python3, not on any other python.
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "# installing test peers: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

cargo test --workspace --all-targets "$@"
# Once more confined to one CPU: the engine and the NBD driver take other
# paths there (sequential fan-out, no blocking-pool hand-off).
taskset -c 0 cargo test -p quorum -p quorum-engine --all-targets "$@"
