#!/usr/bin/env bash
# The one benchmark command: our mirror side by side with static nginx (reference limit),
# peer A (CNCF distribution proxy) and peer B (nginx proxy_cache), all pulling through the same
# counting upstream. Starts what it needs, writes bench/results/<date>.{json,md}, prints the
# table, and stops everything it started (also on error / Ctrl-C).
#
#   bash bench/run.sh                                    # full suite, 3 interleaved reps
#   bash bench/run.sh --reps 1 --phases warm,manifest    # extra args go to run.py
#   TARGETS=mirror bash bench/run.sh                     # only static + our mirror (no peers)
#   BIG_MIB=64 bash bench/run.sh --reps 1 --wrk-duration 3s --quiet-wait 0   # quick trial
#
# Env: TARGETS   targets besides static, space/comma separated from: peerA peerB mirror
#                (default "peerA peerB mirror")
#      BIG_MIB   size of the big blob in MiB (default 1024; a change re-populates the upstream)
#      REPS (3), QUIET_WAIT (30), REPOPULATE=1, OUT (results JSON path), CLEAN=1 (also delete the
#      upstream data, image layout and static tree at the end), UPSTREAM_RATE, PYTHON (mirror's
#      interpreter, see mirror.sh), MIRROR_ARGS (extra `mirror serve` args)
set -euo pipefail
source "$(dirname "$0")/common.sh"

TARGETS=${TARGETS:-"peerA peerB mirror"}
TARGETS=${TARGETS//,/ }
BIG_MIB=${BIG_MIB:-1024}
SMALL_COUNT=${SMALL_COUNT:-8}
export BIG_MIB SMALL_COUNT
REPS=${REPS:-3}
RESULTS_DIR="$BENCH_DIR/results"
STAMP=$(date +%Y-%m-%d_%H%M%S)
OUT=${OUT:-$RESULTS_DIR/$STAMP.json}
MD=${OUT%.json}.md
MIRROR_PORT=${MIRROR_PORT:-5000}

for t in $TARGETS; do
  case $t in peerA|peerB|mirror) ;; static) ;; *) echo "unknown target '$t' in TARGETS (peerA peerB mirror)" >&2; exit 2 ;; esac
done
want() { [[ " $TARGETS " == *" $1 "* ]]; }

missing=()
for c in docker-registry skopeo nginx wrk curl python3; do command -v "$c" >/dev/null || missing+=("$c"); done
if ((${#missing[@]})); then
  echo "missing: ${missing[*]} (Debian: apt-get install -y docker-registry skopeo nginx wrk curl)" >&2
  exit 1
fi

# Remember what was already running, so teardown only stops what this run started.
declare -A WAS_RUNNING=()
for n in upstream-registry upstream-front static peerA peerB mirror; do
  if pid_alive "$n"; then WAS_RUNNING[$n]=1; else WAS_RUNNING[$n]=0; fi
done

teardown() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  log "teardown"
  if [[ -n ${RUNPY_PID:-} ]] && kill -0 "$RUNPY_PID" 2>/dev/null; then
    # run.py and its direct children (wrk, skopeo, a reset command), by pid
    kill -TERM "$RUNPY_PID" $(pgrep -P "$RUNPY_PID") 2>/dev/null; wait "$RUNPY_PID" 2>/dev/null
  fi
  for p in static peerA peerB; do
    [[ ${WAS_RUNNING[$p]} == 1 ]] || bash "$BENCH_DIR/peers.sh" stop "$p"
  done
  [[ ${WAS_RUNNING[peerA]} == 1 ]] || rm -rf "$PEERA_STORE"
  [[ ${WAS_RUNNING[peerB]} == 1 ]] || rm -rf "$PEERB_STORE"
  if [[ ${WAS_RUNNING[mirror]} == 0 ]]; then
    bash "$BENCH_DIR/mirror.sh" stop
    rm -rf "${MIRROR_DATA_DIR:-/tmp/bench-mirror}"
  fi
  if [[ ${WAS_RUNNING[upstream-registry]} == 0 || ${WAS_RUNNING[upstream-front]} == 0 ]]; then
    bash "$BENCH_DIR/upstream.sh" stop
  fi
  rm -rf /tmp/bench-pull
  [[ ${CLEAN:-0} == 1 ]] && bash "$BENCH_DIR/upstream.sh" clean
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- upstream + images
bash "$BENCH_DIR/upstream.sh" start

populated() {
  [[ -f $RUN_DIR/meta.json && -f $STATIC_ROOT/manifests.conf ]] || return 1
  local info digest path
  # params must match, and the upstream registry (backend port: keeps the counting log clean)
  # must still hold the big image's manifest and blob
  info=$(python3 - "$RUN_DIR/meta.json" <<'EOF'
import json, os, sys
m = json.load(open(sys.argv[1]))
p = m.get("params", {})
if p.get("big_mib") != int(os.environ["BIG_MIB"]) or p.get("small_count") != int(os.environ["SMALL_COUNT"]):
    sys.exit(1)
print(m["big_image"]["manifest_digest"], m["big_blob"]["path"])
EOF
) || return 1
  read -r digest path <<<"$info"
  local b="http://127.0.0.1:$UPSTREAM_BACKEND_PORT"
  # the tag must still point at the recorded manifest (HEAD needs the OCI Accept, else 404)
  local hdrs
  hdrs=$(curl -sfI -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$b/v2/bench/library/big/manifests/1") || return 1
  [[ ${hdrs,,} == *"docker-content-digest: $digest"* ]] || return 1
  [[ $(curl -s -o /dev/null -w '%{http_code}' -I "$b$path") == 200 ]] || return 1
  [[ -e $STATIC_ROOT$path ]] || return 1
}
if [[ ${REPOPULATE:-0} == 1 ]] || ! populated; then
  log "populating the upstream (BIG_MIB=$BIG_MIB)"
  bash "$BENCH_DIR/upstream.sh" populate
else
  log "upstream already populated (BIG_MIB=$BIG_MIB), skipping populate"
fi

# --- targets
args=(--target "static=http://127.0.0.1:$STATIC_PORT" --kind static=static --pidfile "static=$RUN_DIR/static.pid")
bash "$BENCH_DIR/peers.sh" stop static   # restart: picks up a freshly built static tree
bash "$BENCH_DIR/peers.sh" start static
for p in peerA peerB; do
  want "$p" || continue
  bash "$BENCH_DIR/peers.sh" reset "$p"
  port=$PEERA_PORT; [[ $p == peerB ]] && port=$PEERB_PORT
  args+=(--target "$p=http://127.0.0.1:$port" --pidfile "$p=$RUN_DIR/$p.pid"
         --reset "$p=bash $BENCH_DIR/peers.sh reset $p")
done
if want mirror; then
  bash "$BENCH_DIR/mirror.sh" reset
  args+=(--target "mirror=http://127.0.0.1:$MIRROR_PORT" --pidfile "mirror=$RUN_DIR/mirror.pid"
         --reset "mirror=bash $BENCH_DIR/mirror.sh reset")
fi

mkdir -p "$RESULTS_DIR" "$(dirname "$OUT")"
log "targets: static $TARGETS; results: $OUT"
# in the background + wait, so that INT/TERM reach the traps at once (teardown stops run.py too)
python3 "$BENCH_DIR/run.py" "${args[@]}" --reps "$REPS" --quiet-wait "${QUIET_WAIT:-30}" \
  --out "$OUT" --md "$MD" "$@" &
RUNPY_PID=$!
rc=0; wait "$RUNPY_PID" || rc=$?
RUNPY_PID=
((rc == 0)) || { log "run.py failed (exit $rc); partial results (if any): $OUT"; exit "$rc"; }
log "results: $OUT  table: $MD"
