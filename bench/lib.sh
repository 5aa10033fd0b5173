# Shell helpers shared by bench/heal.sh and bench/scrub.sh (sourced).

stop_pid() { # SIGTERM, wait up to 10 s, then SIGKILL
  local p=$1 i
  kill -0 "$p" 2>/dev/null || return 0
  kill "$p" 2>/dev/null
  for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
  wait "$p" 2>/dev/null || true
}
now() { date +%s.%N; }
wait_sock() { # $1=pid $2=uri: bounded wait until the export answers
  local i
  for i in $(seq 200); do
    timeout 5 nbdinfo --size "$2" >/dev/null 2>&1 && return 0
    kill -0 "$1" 2>/dev/null || break
    sleep 0.05
  done
  echo "daemon $1 did not come up" >&2; return 1
}
