#!/usr/bin/env bash
# Benchmarks of issue 10 (redundancy that heals itself), on tmpfs (page cache),
# 3 raw replicas, threshold 2, release build.
#
# Part "writes": fio over NBD (unix socket), 1 MiB sequential write (QD4, two
# passes) and 4 KiB random write (QD32, time based), for every target in one
# run, reps interleaved target by target:
#   qemu-quorum-raw     qemu-storage-daemon exporting QEMU's quorum driver
#                       (the command bench_vs_qemu.sh uses, aio=threads)
#   quorum-tracking     quorum serve, write intent and missed tracking on
#                       (the default); record on the same tmpfs
#   quorum-tracking-disk  the same with the record on persistent storage
#                       ($DISK_STATE_DIR, default /var/tmp): real fdatasyncs
#   quorum-no-tracking  quorum serve --no-tracking
# Part "resync": a RESYNC_GIB (4) GiB disk filled with data; replica 3 is moved
# away, the daemon started degraded (--resync-rate 0), MISSED_MIB ("64 512")
# MiB written at random 64 KiB-aligned offsets (fio randwrite, no repeats),
# then the file is moved back: the retry thread reopens it (same inode: same
# identity), it becomes stale, and the resync copies what it missed. Time =
# the daemon's own log timestamps, from "replica-2 is stale again" to "resync
# of replica-2 completed". Then a full rebuild: the file is deleted, the
# daemon started degraded, an empty file created in its place (a new
# identity: state new, everything missed) and timed the same way; and `cp` of
# the whole replica as the reference copy. Every resync ends with `cmp`
# against replica 1.
#
# Daemons are pinned to DAEMON_CPU (1), clients and cp to CLIENT_CPU (0), as
# bench/run.sh does. Raw rows go to $OUT (a TSV like the harness's), the
# summary to stdout. Processes are stopped by PID; files are removed at exit.
#
# Environment: BASE (/dev/shm/quorum-heal-bench), OUT, REPS (3), SIZE_MIB
# (1024), RUNTIME (4), RAMP (1), PARTS ("writes resync"), RESYNC_GIB (4),
# MISSED_MIB ("64 512"), DISK_STATE_DIR (/var/tmp), TARGETS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
BASE=${BASE:-/dev/shm/quorum-heal-bench}
OUT=${OUT:-$BASE/results.tsv}
REPS=${REPS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
RUNTIME=${RUNTIME:-4}
RAMP=${RAMP:-1}
PARTS=${PARTS:-writes resync}
RESYNC_GIB=${RESYNC_GIB:-4}
MISSED_MIB=${MISSED_MIB:-64 512}
DAEMON_CPU=${DAEMON_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
DISK_STATE_DIR=${DISK_STATE_DIR:-/var/tmp}
TARGETS=${TARGETS:-qemu-quorum-raw quorum-tracking quorum-tracking-disk quorum-no-tracking}

for t in qemu-storage-daemon qemu-img fio nbdinfo taskset python3 openssl cmp; do
  command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }
done
(cd "$root" && cargo build --release -q -p quorum)
Q=$root/target/release/quorum
IMG=$BASE/img RUN=$BASE/run
mkdir -p "$IMG" "$RUN"
DISK_STATE=$(mktemp -d "$DISK_STATE_DIR/quorum-heal-bench.XXXXXX")
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  rm -rf "$IMG" "$DISK_STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; } # utime+stime of one process
HZ=$(getconf CLK_TCK)
gen() { # $1=key $2=out $3=MiB: deterministic pseudo-random content
  openssl enc -aes-128-ctr -nosalt -K "$(printf "%032d" "$1")" -iv 00000000000000000000000000000000 \
    -in /dev/zero 2>/dev/null | head -c $(($3 * 1048576)) > "$2" || true
  [ "$(stat -c %s "$2")" = $(($3 * 1048576)) ] || { echo "image generation failed: $2" >&2; exit 1; }
}
xml() { # $1=out $2.. replica files
  local out=$1; shift
  {
    echo "<disk type='quorum' device='disk'>"
    echo "  <threshold value='2'/>"
    for f in "$@"; do
      echo "  <backingStore type='file'><format type='raw'/><source file='$f'/></backingStore>"
    done
    echo "  <target dev='vda' bus='virtio'/>"
    echo "</disk>"
  } > "$out"
}
wait_log() { # $1=log $2=regex $3=seconds: bounded wait for a log line
  local i
  for i in $(seq $(($3 * 10))); do
    grep -qE "$2" "$1" && return 0
    sleep 0.1
  done
  echo "not within $3 s: '$2' in $1:" >&2; tail -20 "$1" >&2; return 1
}
log_ts() { # $1=log $2=regex: the first matching line's timestamp, in seconds
  grep -m1 -E "$2" "$1" | python3 -c '
import sys, datetime
t = sys.stdin.read().split()[0].rstrip("Z")
d = datetime.datetime.fromisoformat(t[:26])
print(d.replace(tzinfo=datetime.timezone.utc).timestamp())'
}

# ------------------------------------------------------------------ writes
START_PID=0
start_target() { # $1=target $2=socket: sets START_PID
  local t=$1 sock=$2 x=$RUN/quorum.xml
  rm -f "$sock"
  xml "$x" "$IMG/r1.raw" "$IMG/r2.raw" "$IMG/r3.raw"
  local node='{"driver":"quorum","node-name":"q","vote-threshold":2,"read-pattern":"quorum","children":['
  node+="{\"driver\":\"file\",\"filename\":\"$IMG/r1.raw\",\"aio\":\"threads\",\"locking\":\"off\"},"
  node+="{\"driver\":\"file\",\"filename\":\"$IMG/r2.raw\",\"aio\":\"threads\",\"locking\":\"off\"},"
  node+="{\"driver\":\"file\",\"filename\":\"$IMG/r3.raw\",\"aio\":\"threads\",\"locking\":\"off\"}]}"
  case $t in
    qemu-quorum-raw)
      taskset -c "$DAEMON_CPU" qemu-storage-daemon --blockdev "$node" \
        --nbd-server addr.type=unix,addr.path="$sock" \
        --export type=nbd,id=e0,node-name=q,name=disk,writable=on > "$RUN/$t.log" 2>&1 &;;
    quorum-tracking)
      taskset -c "$DAEMON_CPU" "$Q" serve "$x" --socket "$sock" --export disk --no-locking \
        --state "$RUN/tracking.state" > "$RUN/$t.log" 2>&1 &;;
    quorum-tracking-disk)
      taskset -c "$DAEMON_CPU" "$Q" serve "$x" --socket "$sock" --export disk --no-locking \
        --state "$DISK_STATE/tracking.state" > "$RUN/$t.log" 2>&1 &;;
    quorum-no-tracking)
      taskset -c "$DAEMON_CPU" "$Q" serve "$x" --socket "$sock" --export disk --no-locking \
        --no-tracking > "$RUN/$t.log" 2>&1 &;;
    *) echo "unknown target $t" >&2; exit 2;;
  esac
  START_PID=$!
  PIDS+=("$START_PID")
  wait_sock "$START_PID" "nbd+unix:///disk?socket=$sock"
  case $t in quorum-tracking*)
    # First start: the record is new, so the replicas are compared in full
    # first; measure after that, as on every later start.
    wait_log "$RUN/$t.log" "every region of the replicas has been compared" 300;;
  esac
}

client() { # $1=uri $2=metric: prints "VALUE UNIT OPS"
  local u=$1 m=$2 out=$RUN/fio.json
  local common=(--name=j --ioengine=nbd --uri="$u" --output-format=json --output="$out" --randrepeat=1)
  case $m in
    seqwrite)
      timeout 300 /usr/bin/time -a -o "$RUN/client.time" -f "%U %S" taskset -c "$CLIENT_CPU" \
        fio "${common[@]}" --rw=write --bs=1M --iodepth=4 --size=${SIZE_MIB}M --loops=2 --end_fsync=1 >/dev/null
      python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(j["bw_bytes"]/1048576, "MiB/s", j["total_ios"])' "$out";;
    randwrite32)
      timeout $((RUNTIME + RAMP + 60)) /usr/bin/time -a -o "$RUN/client.time" -f "%U %S" taskset -c "$CLIENT_CPU" \
        fio "${common[@]}" --norandommap --rw=randwrite --bs=4k --iodepth=32 --size=${SIZE_MIB}M \
        --time_based=1 --runtime="$RUNTIME" --ramp_time="$RAMP" >/dev/null
      python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(j["iops"], "IOPS", j["total_ios"])' "$out";;
  esac
}

part_writes() {
  echo "# writes: generating $SIZE_MIB MiB replicas in $IMG" >&2
  gen 1 "$IMG/r1.raw" "$SIZE_MIB"
  cp "$IMG/r1.raw" "$IMG/r2.raw"; cp "$IMG/r1.raw" "$IMG/r3.raw"
  declare -A TP=()
  for t in $TARGETS; do start_target "$t" "$RUN/$t.sock"; TP[$t]=$START_PID; done
  # Warm-up: one untimed pass of each metric per target.
  for t in $TARGETS; do
    for m in seqwrite randwrite32; do client "nbd+unix:///disk?socket=$RUN/$t.sock" $m >/dev/null; done
  done
  for rep in $(seq "$REPS"); do
    for m in seqwrite randwrite32; do
      for t in $TARGETS; do
        : > "$RUN/client.time"
        local u="nbd+unix:///disk?socket=$RUN/$t.sock" d0 d1 b0 b1 w0 w1 line val unit ops ccpu
        d0=$(ticks "${TP[$t]}"); b0=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat); w0=$(now)
        line=$(client "$u" $m)
        w1=$(now); b1=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat); d1=$(ticks "${TP[$t]}")
        read -r val unit ops <<<"$line"
        ccpu=$(awk '{s+=$1+$2} END{printf "%.3f", s}' "$RUN/client.time")
        read -r wall dcpu foreign <<<"$(python3 -c "w=$w1-$w0; d=($d1-$d0)/$HZ; b=($b1-$b0)/$HZ; print('%.3f %.3f %.1f' % (w, d, max(0, 100*(b-d-$ccpu)/w/$(nproc))))")"
        printf '%s\t%s\tfio\t%s\t%.1f\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$t" "$m" "$val" "$unit" "$ops" "$wall" "$dcpu" "$ccpu" "$foreign" >> "$OUT"
        printf '# rep %s %-22s %-12s %10.1f %s (daemon cpu %ss / wall %ss)\n' "$rep" "$t" "$m" "$val" "$unit" "$dcpu" "$wall" >&2
      done
    done
  done
  for t in $TARGETS; do stop_pid "${TP[$t]}"; done
  rm -f "$IMG"/r{1,2,3}.raw
}

# ------------------------------------------------------------------ resync
serve_resync() { # $1=log: start quorum serve on the resync disk, sets START_PID
  rm -f "$RUN/resync.sock"
  taskset -c "$DAEMON_CPU" "$Q" serve "$RUN/resync.xml" --socket "$RUN/resync.sock" \
    --resync-rate 0 --state "$RUN/resync.state" > "$1" 2>&1 &
  START_PID=$!
  PIDS+=("$START_PID")
  wait_sock "$START_PID" "nbd+unix:///vda?socket=$RUN/resync.sock"
}

# One resync: replica 3 misses $1 MiB (or, with $1 = full, is replaced by an
# empty file); prints the TSV row.
resync_once() {
  local missed=$1 rep=$2 log=$RUN/resync-$1-$2.log uri="nbd+unix:///vda?socket=$RUN/resync.sock"
  if [ "$missed" = full ]; then rm "$IMG/r3.raw"; else mv "$IMG/r3.raw" "$IMG/r3.hold"; fi
  serve_resync "$log"
  local pid=$START_PID
  if [ "$missed" != full ]; then
    # Scattered 64 KiB writes, each offset once (fio's random map).
    timeout 300 taskset -c "$CLIENT_CPU" fio --name=m --ioengine=nbd --uri="$uri" --rw=randwrite \
      --bs=64k --iodepth=16 --size=${RESYNC_GIB}G --io_size=${missed}M --randrepeat=0 \
      --output=/dev/null >/dev/null
    mv "$IMG/r3.hold" "$IMG/r3.raw"
  else
    truncate -s ${RESYNC_GIB}G "$IMG/r3.raw"
  fi
  local d0; d0=$(ticks "$pid")
  wait_log "$log" "resync of replica-2 completed" 600
  local d1; d1=$(ticks "$pid")
  local t0 t1
  t0=$(log_ts "$log" "replica replica-2 is (stale|new) again")
  t1=$(log_ts "$log" "resync of replica-2 completed")
  stop_pid "$pid"
  cmp "$IMG/r1.raw" "$IMG/r3.raw" || { echo "replica 3 differs from replica 1 after the resync" >&2; exit 1; }
  local bytes
  if [ "$missed" = full ]; then bytes=$((RESYNC_GIB * 1073741824)); else bytes=$((missed * 1048576)); fi
  python3 -c "
s=$t1-$t0; b=$bytes
print('%s\tquorum-resync-%s\tlog\tresync\t%.1f\tMiB/s\t%d\t%.3f\t%.3f\t0\t0' % ('$rep', '$missed', b/1048576/s, b//65536, s, ($d1-$d0)/$HZ))" >> "$OUT"
  tail -1 "$OUT" | awk -F'\t' '{printf "# rep %s %-22s %8.1f MiB/s in %ss (daemon cpu %ss)\n", $1, $2, $5, $8, $9}' >&2
}

part_resync() {
  echo "# resync: generating a $RESYNC_GIB GiB disk in $IMG" >&2
  gen 3 "$IMG/r1.raw" $((RESYNC_GIB * 1024))
  cp "$IMG/r1.raw" "$IMG/r2.raw"; cp "$IMG/r1.raw" "$IMG/r3.raw"
  xml "$RUN/resync.xml" "$IMG/r1.raw" "$IMG/r2.raw" "$IMG/r3.raw"
  rm -f "$RUN/resync.state"
  # First start: a new record, so a full comparison; then one write, so the
  # comparison's cleared dirty bits reach the file (see the engine note in
  # bench/README.md), and a clean stop.
  serve_resync "$RUN/resync-first.log"
  wait_log "$RUN/resync-first.log" "every region of the replicas has been compared" 600
  qemu-io -f raw -c "write -z 0 4k" "nbd+unix:///vda?socket=$RUN/resync.sock" >/dev/null
  stop_pid "$START_PID"
  # Per rep: the reference copy first, then the full rebuild (both replace
  # replica 3's file; the rebuild's file is the one the record then knows),
  # then the partial resyncs of that same file.
  for rep in $(seq "$REPS"); do
    # Reference: a plain copy of the whole replica, page cache to page cache.
    rm "$IMG/r3.raw"
    local t0 t1; t0=$(now)
    taskset -c "$DAEMON_CPU" cp "$IMG/r1.raw" "$IMG/r3.raw"
    t1=$(now)
    python3 -c "
s=$t1-$t0; b=$RESYNC_GIB*1073741824
print('%s\tcp-full\tcp\tresync\t%.1f\tMiB/s\t%d\t%.3f\t0\t0\t0' % ('$rep', b/1048576/s, b//65536, s))" >> "$OUT"
    tail -1 "$OUT" | awk -F'\t' '{printf "# rep %s %-22s %8.1f MiB/s in %ss\n", $1, $2, $5, $8}' >&2
    for m in full $MISSED_MIB; do resync_once "$m" "$rep"; done
  done
  rm -f "$IMG"/r{1,2,3}.raw "$IMG/r3.hold"
}

[ -s "$OUT" ] || printf 'rep\ttarget\tclient\tmetric\tvalue\tunit\tops\twall_s\tdaemon_cpu_s\tclient_cpu_s\tforeign_cpu_pct\n' > "$OUT"
echo "# parts: $PARTS | reps: $REPS | daemon on CPU $DAEMON_CPU, clients on CPU $CLIENT_CPU | rows: $OUT" >&2
for p in $PARTS; do "part_$p"; done
python3 "$here/heal_summary.py" "$OUT"
