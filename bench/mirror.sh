#!/usr/bin/env bash
# Our mirror as a benchmark target (upstream = the counting front http://127.0.0.1:5101).
#   mirror.sh start   run `python -m mirror serve` from the project root in the background and
#                     wait until GET http://127.0.0.1:5000/v2/ answers 200
#   mirror.sh stop    stop it (only the pid recorded in /tmp/bench-run/mirror.pid)
#   mirror.sh reset   stop, wipe the cache dir, start (= running with an empty cache; run.py --reset)
#   mirror.sh status
# Python: $PYTHON if set, else <project>/.venv/bin/python if it exists, else python3.
# Env: MIRROR_PORT (5000), MIRROR_DATA_DIR (/tmp/bench-mirror), MIRROR_ARGS (extra serve args),
#      MIRROR_START_TIMEOUT (s, default 60). Log: /tmp/bench-run/mirror.out.
set -euo pipefail
source "$(dirname "$0")/common.sh"

PROJECT_ROOT="$(cd "$BENCH_DIR/.." && pwd)"
MIRROR_PORT="${MIRROR_PORT:-5000}"
MIRROR_DATA_DIR="${MIRROR_DATA_DIR:-/tmp/bench-mirror}"
MIRROR_URL="http://127.0.0.1:$MIRROR_PORT"
MIRROR_START_TIMEOUT="${MIRROR_START_TIMEOUT:-60}"

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x $PROJECT_ROOT/.venv/bin/python ]]; then PY=$PROJECT_ROOT/.venv/bin/python
else PY=python3
fi

# last_output: the log since the latest start marker
last_output() {
  awk '/^=== .* start$/ {buf = ""} {buf = buf $0 "\n"} END {printf "%s", buf}' "$RUN_DIR/mirror.out" | tail -25 >&2
}

# port_busy: something already accepts connections on the mirror port
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$MIRROR_PORT") 2>/dev/null; }

start() {
  if pid_alive mirror; then log "mirror already running (pid $(cat "$RUN_DIR/mirror.pid"))"; return 0; fi
  if port_busy; then
    log "port $MIRROR_PORT is already in use by another process (not ours); not starting"
    return 1
  fi
  mkdir -p "$MIRROR_DATA_DIR"
  # shellcheck disable=SC2206
  local extra=(${MIRROR_ARGS:-})
  echo "=== $(date '+%F %T') start" >>"$RUN_DIR/mirror.out"
  (cd "$PROJECT_ROOT" && start_bg mirror "$PY" -m mirror serve --listen "127.0.0.1:$MIRROR_PORT" \
     --data-dir "$MIRROR_DATA_DIR" --upstream "$UPSTREAM_URL" "${extra[@]}")
  local deadline=$((SECONDS + MIRROR_START_TIMEOUT)) code
  while ((SECONDS < deadline)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$MIRROR_URL/v2/" || true)
    [[ $code == 200 ]] && { log "mirror ready: $MIRROR_URL (pid $(cat "$RUN_DIR/mirror.pid"))"; return 0; }
    if ! pid_alive mirror; then
      log "mirror exited during start; last output ($RUN_DIR/mirror.out):"
      last_output
      rm -f "$RUN_DIR/mirror.pid"
      return 1
    fi
    sleep 0.1
  done
  log "mirror: GET $MIRROR_URL/v2/ did not answer 200 within ${MIRROR_START_TIMEOUT}s (last: ${code:-none}); stopping it"
  last_output
  stop
  return 1
}

stop() { stop_bg mirror "mirror serve"; }

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  reset|restart) stop; rm -rf "$MIRROR_DATA_DIR"; start ;;
  status)
    if pid_alive mirror; then echo "running pid $(cat "$RUN_DIR/mirror.pid") $MIRROR_URL"; else echo "not running"; exit 1; fi ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
