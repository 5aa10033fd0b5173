#!/usr/bin/env bash
# Runs the whole test suite. Installs the Debian test peers first when any is
# missing (needs root or sudo): qemu-system-x86 from bookworm-backports, the
# rest from bookworm. README and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
            qemu-storage-daemon:qemu-utils \
            nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdkit:nbdkit fio:fio \
            virsh:libvirt-clients virt-xml-validate:libvirt-clients \
            xmllint:libxml2-utils systemd-analyze:systemd promtool:prometheus; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
# nbdsh is a python module on Debian's python3, not on any other python.
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
# python3-venv: the venv below, for qemu.qmp (the monitor tests).
/usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "# installing test peers: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

# qemu-system-x86_64, for the qemu-args recipe test, comes from bookworm-backports
# like qemu-utils 10: bookworm's own qemu-system-x86 (7.2) would remove qemu-utils 10.
# Backports is added on the Debian mirror apt already uses.
install_qemu_system() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 && return 0
  local sudo="" mirror
  [ "$(id -u)" = 0 ] || sudo=sudo
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    mirror=${mirror:-$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
    [ -n "$mirror" ] || { echo "no Debian bookworm mirror configured for apt" >&2; return 1; }
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" \
      | $sudo tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
  fi
  echo "# installing test peer: qemu-system-x86 (bookworm-backports)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
}
install_qemu_system

# libvirtd with its QEMU driver, for the real-VM test (crates/quorum/tests/
# libvirt_vm.rs), without recommends: those would pull bookworm's own
# qemu-system (7.2) in beside the backports build.
install_libvirtd() {
  command -v libvirtd >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "# installing test peers: libvirt-daemon libvirt-daemon-driver-qemu" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    libvirt-daemon libvirt-daemon-driver-qemu >/dev/null
}
install_libvirtd

# qemu.qmp (PyPI: QMPClient and qmp-shell) in a venv at a stable path, for
# crates/quorum/tests/qmp_python.rs, which finds it through QUORUM_QMP_VENV
# and fails when it is missing.
export QUORUM_QMP_VENV="${QUORUM_QMP_VENV:-$PWD/target/qmp-venv}"
if ! "$QUORUM_QMP_VENV/bin/python" -c 'import qemu.qmp' >/dev/null 2>&1; then
  echo "# installing qemu.qmp into $QUORUM_QMP_VENV" >&2
  /usr/bin/python3 -m venv --clear "$QUORUM_QMP_VENV"
  "$QUORUM_QMP_VENV/bin/pip" install -q qemu.qmp
fi

cargo test --workspace --all-targets "$@"
# Once more confined to one CPU: the engine and the NBD driver take other
# paths there (sequential fan-out, no blocking-pool hand-off).
taskset -c 0 cargo test -p quorum -p quorum-engine --all-targets "$@"
