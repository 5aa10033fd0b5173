#!/usr/bin/env bash
# Benchmarks of issue 12's online scrub, on tmpfs (page cache), 3 raw
# replicas of SIZE_MIB (1024) filled with data, threshold 2, release build.
#
# Part "speed": how long one pass over every block of every replica takes,
# REPS (3) times, interleaved target by target:
#   qemu-full-read    nbdcopy of the whole disk to null: through
#                     qemu-storage-daemon exporting QEMU's quorum driver (the
#                     harness's command, aio=threads): QEMU has no scrub, and
#                     reading everything through its driver is the closest it
#                     comes (it votes, and repairs only with rewrite-corrupted)
#   quorum-full-read  the same nbdcopy through quorum serve
#   quorum-scrub      quorum scrub --qmp SOCK --rate 0 --wait, same daemon:
#                     the online scrub (rate 0, no repair)
#   quorum-check      quorum check, the offline scrub, on its own record
# Part "impact": fio 4 KiB random reads (QD32, RUNTIME s after RAMP s)
# through quorum serve, alone and while an online scrub runs unthrottled and
# at 200 MiB/s (restarted whenever it ends, so it runs the whole time).
#
# Daemons are pinned to DAEMON_CPU (1), clients to CLIENT_CPU (0), as
# bench/run.sh does. Both daemons serve the same images without locks (the
# harness's way). Processes are stopped by PID; files are removed at exit.
#
# Environment: BASE (/dev/shm/quorum-scrub-bench), REPS (3), SIZE_MIB (1024),
# RUNTIME (5), RAMP (1), PARTS ("speed impact").
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
BASE=${BASE:-/dev/shm/quorum-scrub-bench}
REPS=${REPS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
RUNTIME=${RUNTIME:-5}
RAMP=${RAMP:-1}
PARTS=${PARTS:-speed impact}
DAEMON_CPU=${DAEMON_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}

for t in qemu-storage-daemon nbdcopy nbdinfo fio taskset openssl python3; do
  command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }
done
(cd "$root" && cargo build --release -q -p quorum)
Q=$root/target/release/quorum
IMG=$BASE/img RUN=$BASE/run
mkdir -p "$IMG" "$RUN"
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  rm -rf "$BASE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo "# generating 3 x $SIZE_MIB MiB of data" >&2
openssl enc -aes-128-ctr -nosalt -K 00000000000000000000000000000001 \
  -iv 00000000000000000000000000000000 -in /dev/zero 2>/dev/null \
  | head -c $((SIZE_MIB * 1048576)) > "$IMG/r1.raw" || true
cp "$IMG/r1.raw" "$IMG/r2.raw"
cp "$IMG/r1.raw" "$IMG/r3.raw"

X=$RUN/disk.xml
{
  echo "<disk type='quorum' device='disk'>"
  echo "  <threshold value='2'/>"
  for f in r1 r2 r3; do
    echo "  <backingStore type='file'><format type='raw'/><source file='$IMG/$f.raw'/></backingStore>"
  done
  echo "  <target dev='vda' bus='virtio'/>"
  echo "</disk>"
} > "$X"
node='{"driver":"quorum","node-name":"q","vote-threshold":2,"read-pattern":"quorum","children":['
node+="{\"driver\":\"file\",\"filename\":\"$IMG/r1.raw\",\"aio\":\"threads\",\"locking\":\"off\"},"
node+="{\"driver\":\"file\",\"filename\":\"$IMG/r2.raw\",\"aio\":\"threads\",\"locking\":\"off\"},"
node+="{\"driver\":\"file\",\"filename\":\"$IMG/r3.raw\",\"aio\":\"threads\",\"locking\":\"off\"}]}"

QSOCK=$RUN/qemu.sock OSOCK=$RUN/quorum.sock MON=$RUN/quorum.qmp
taskset -c "$DAEMON_CPU" qemu-storage-daemon --blockdev "$node" \
  --nbd-server addr.type=unix,addr.path="$QSOCK" \
  --export type=nbd,id=e0,node-name=q,name=disk,writable=off > "$RUN/qemu.log" 2>&1 &
PIDS+=($!); QPID=$!
taskset -c "$DAEMON_CPU" "$Q" serve "$X" --socket "$OSOCK" --export disk --no-locking \
  --state "$RUN/serve.state" --qmp "$MON" > "$RUN/quorum.log" 2>&1 &
PIDS+=($!); OPID=$!
QURI="nbd+unix:///disk?socket=$QSOCK" OURI="nbd+unix:///disk?socket=$OSOCK"
wait_sock "$QPID" "$QURI"
wait_sock "$OPID" "$OURI"
# serve's first start compares every region of a new record: let it finish.
for i in $(seq 600); do
  grep -q "every region of the replicas has been compared" "$RUN/quorum.log" && break
  sleep 0.1
done

if [[ " $PARTS " == *" speed "* ]]; then
  declare -A T
  for rep in $(seq "$REPS"); do
    for t in qemu-full-read quorum-full-read quorum-scrub quorum-check; do
      t0=$(now)
      case $t in
        qemu-full-read) taskset -c "$CLIENT_CPU" timeout 600 nbdcopy "$QURI" null: ;;
        quorum-full-read) taskset -c "$CLIENT_CPU" timeout 600 nbdcopy "$OURI" null: ;;
        quorum-scrub) taskset -c "$CLIENT_CPU" timeout 600 "$Q" scrub --qmp "$MON" --rate 0 --wait >/dev/null ;;
        quorum-check) rm -f "$RUN/check.state"
          taskset -c "$DAEMON_CPU" timeout 600 "$Q" check "$X" --state "$RUN/check.state" >/dev/null ;;
      esac
      t1=$(now)
      s=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
      T[$t]="${T[$t]:-} $s"
      echo "# rep $rep $t: $s s" >&2
    done
  done
  echo
  echo "one pass over ${SIZE_MIB} MiB x 3 replicas (median of $REPS, wall seconds; GiB/s of the virtual disk)"
  ref=$(median ${T[qemu-full-read]})
  for t in qemu-full-read quorum-full-read quorum-scrub quorum-check; do
    m=$(median ${T[$t]})
    python3 -c "print(f'{\"$t\":18} {$m:7.3f} s  {$SIZE_MIB/1024/$m:5.2f} GiB/s  {$ref/$m:5.2f}x qemu-full-read   [${T[$t]# } ]')"
  done
fi

if [[ " $PARTS " == *" impact "* ]]; then
  fio_iops() {
    taskset -c "$CLIENT_CPU" timeout $((RUNTIME + RAMP + 60)) fio --name=r --ioengine=nbd \
      --uri="$OURI" --rw=randread --bs=4k --iodepth=32 --size=${SIZE_MIB}M \
      --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --output-format=json \
      | python3 -c 'import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"]))'
  }
  scrub_loop() { # keep a scrub running at rate $1 until killed
    while true; do "$Q" scrub --qmp "$MON" --rate "$1" --wait >/dev/null 2>&1 || true; done
  }
  declare -A I
  for rep in $(seq "$REPS"); do
    for mode in alone scrub-unthrottled scrub-200M; do
      lp=""
      case $mode in
        scrub-unthrottled) scrub_loop 0 & lp=$! ;;
        scrub-200M) scrub_loop 200M & lp=$! ;;
      esac
      v=$(fio_iops)
      if [ -n "$lp" ]; then
        kill "$lp" 2>/dev/null; wait "$lp" 2>/dev/null || true
        "$Q" scrub --qmp "$MON" --cancel >/dev/null 2>&1 || true
      fi
      I[$mode]="${I[$mode]:-} $v"
      echo "# rep $rep $mode: $v IOPS" >&2
    done
  done
  echo
  echo "4 KiB random read QD32 through quorum serve, while an online scrub runs (median of $REPS)"
  base=$(median ${I[alone]})
  for mode in alone scrub-unthrottled scrub-200M; do
    m=$(median ${I[$mode]})
    python3 -c "print(f'{\"$mode\":18} {$m:9.0f} IOPS  {$m/$base:5.2f}x alone   [${I[$mode]# } ]')"
  done
fi
