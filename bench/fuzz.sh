#!/usr/bin/env bash
# Schemathesis fuzzing of the service at a large example count, with the schemathesis CLI (`st run`, v4).
#
# The same fuzzing as tests/service/api/test_schemathesis.py (its CONFIG_TOML dictionaries and the map_case hook of fuzz_steering.py,
# which steers positive bodies to real images / state files; see that module's docstring), with every check
# (`--checks all`), all phases (examples, coverage, fuzzing, and stateful for the reads; see WRITES_FILTER),
# `--continue-on-failure` (every distinct failure of an operation, not only the first) and MAX_EXAMPLES cases per
# operation.
#
# It starts its own servers (`python -m service` on free 127.0.0.1 ports, demo models, temporary state
# directories, API key set, logs into the temporary directory) and stops them at the end:
#   reads        the read operations (all but PUT / DELETE / .../fit)   without key, then with the key
#   writes       PUT, DELETE, .../fit                                    without key (auth limiter as configured)
#   writes-key   PUT, DELETE, .../fit, with the key, on a third server whose failed-auth limiter is raised
#                (OOD_AUTH_FAILURES_PER_MINUTE): the no-key run would otherwise lock 127.0.0.1 out for a minute
#                and ignored_auth's probes (no key / a wrong key after each success) would lock out the key run
# so no write ever changes what the read operations see.
#
# Usage:   bench/fuzz.sh                          # MAX_EXAMPLES=500
#          MAX_EXAMPLES=50 bench/fuzz.sh          # quicker
# Env:     MAX_EXAMPLES (500), SEED (20260101), WORKERS (1), RUN_TIMEOUT_S (900: each of the 4 runs is killed
#          after this), REPORT_DIR (bench/results/fuzz-<timestamp>: each run's console output <run>.txt with
#          every failure and its curl reproduction, its JUnit report, the server logs), PYTHON (.venv/bin/python),
#          ST (.venv/bin/st). (No NDJSON event log: at 500 examples it is ~150 MB per run.)
# Exit:    0 when all 4 runs pass; 1 when any found a failure, errored or timed out.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
ST="${ST:-$ROOT/.venv/bin/st}"
MAX_EXAMPLES="${MAX_EXAMPLES:-500}"
SEED="${SEED:-20260101}"
WORKERS="${WORKERS:-1}"
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-900}"
REPORT_DIR="${REPORT_DIR:-$ROOT/bench/results/fuzz-$(date +%Y%m%dT%H%M%S)}"
KEY="fuzz-key-$(date +%s)-$$"

TMP="$(mktemp -d -t ood-fuzz-XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
mkdir -p "$REPORT_DIR"

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_server NAME STATE_DIR [VAR=VALUE ...]: starts it, waits for /readyz, sets $URL
start_server() {
  local name="$1" states="$2" port
  shift 2
  port="$(free_port)"
  (
    cd "$ROOT"
    exec env -u OOD_CONFIG -u OOD_API_KEYS_FILE OOD_STATE_DIR="$states" OOD_API_KEYS="$KEY" OOD_LOG_LEVEL=WARNING \
      "$@" "$PYTHON" -m service --host 127.0.0.1 --port "$port"
  ) >"$REPORT_DIR/server-$name.log" 2>&1 &
  PIDS+=("$!")
  URL="http://127.0.0.1:$port"
  for _ in $(seq 1 1800); do
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
      echo "server $name exited before it was ready; log: $REPORT_DIR/server-$name.log" >&2
      tail -20 "$REPORT_DIR/server-$name.log" >&2
      exit 1
    fi
    if "$PYTHON" -c 'import sys, httpx; sys.exit(httpx.get(sys.argv[1] + "/readyz", timeout=2).status_code != 200)' \
      "$URL" 2>/dev/null; then
      echo "server $name ready at $URL"
      return
    fi
    sleep 0.1
  done
  echo "server $name not ready after 180 s" >&2
  exit 1
}

# the first start fits the demo states; the other servers get copies
start_server reads "$TMP/states-reads"
READS_URL="$URL"
cp -r "$TMP/states-reads" "$TMP/states-writes"
cp -r "$TMP/states-reads" "$TMP/states-writes-key"
start_server writes "$TMP/states-writes"
WRITES_URL="$URL"
start_server writes-key "$TMP/states-writes-key" OOD_AUTH_FAILURES_PER_MINUTE=1000000
WRITES_KEY_URL="$URL"

(cd "$ROOT" && "$PYTHON" -c 'from tests.service.api.test_schemathesis import CONFIG_TOML; print(CONFIG_TOML)') \
  >"$TMP/schemathesis.toml"
cat >"$TMP/hooks.py" <<'EOF'
"""bench/fuzz.sh: the steering hook of tests/service/api/test_schemathesis.py, with states from the read server."""
import os
import sys

sys.path.insert(0, os.environ["OOD_FUZZ_ROOT"])

import schemathesis

from tests.service.api import test_schemathesis as fuzz

fuzz.load_states(os.environ["OOD_FUZZ_STATES_URL"])
schemathesis.hook(fuzz.map_case)
EOF

# Writes run without the stateful phase: schemathesis 4.32.5 cannot validate a body with binary parts, so when its
# stateful phase injects a captured value into a multipart or octet-stream body it relabels the case negative and
# negative_data_rejection reports the (valid) upload or fit as "schema-violating request accepted" (ST201).
WRITES_FILTER=(--include-method PUT --include-method DELETE --include-path-regex '/fit$'
  --phases examples,coverage,fuzzing)
READS_FILTER=(--exclude-method PUT --exclude-method DELETE --exclude-path-regex '/fit$')
RESULTS=()
FAILED=0

# fuzz NAME URL [st options ...]
fuzz() {
  local name="$1" url="$2" rc=0
  shift 2
  echo
  echo "=== $name: $url, $MAX_EXAMPLES examples per operation, seed $SEED"
  (
    cd "$TMP"
    OOD_FUZZ_ROOT="$ROOT" OOD_FUZZ_STATES_URL="$READS_URL" SCHEMATHESIS_HOOKS="$TMP/hooks.py" \
      timeout --kill-after=30 "$RUN_TIMEOUT_S" "$ST" --config-file "$TMP/schemathesis.toml" --no-color run \
      "$url/openapi.json" \
      --checks all \
      --max-examples "$MAX_EXAMPLES" \
      --seed "$SEED" \
      --workers "$WORKERS" \
      --continue-on-failure \
      --suppress-health-check too_slow \
      --request-timeout 30 \
      --report junit \
      --report-junit-path "$REPORT_DIR/$name.junit.xml" \
      "$@"
  ) 2>&1 | tee "$REPORT_DIR/$name.txt" || rc="${PIPESTATUS[0]}"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    RESULTS+=("$name: TIMED OUT after $RUN_TIMEOUT_S s")
    FAILED=1
  elif [ "$rc" -ne 0 ]; then
    summary="$(grep -E '^=+ .+ in [0-9.]+s =+$' "$REPORT_DIR/$name.txt" | tail -1 | tr -d '=' || true)"
    RESULTS+=("$name: FAILED (st exit $rc):${summary}")
    FAILED=1
  else
    RESULTS+=("$name: passed")
  fi
}

fuzz reads-without-key "$READS_URL" "${READS_FILTER[@]}"
fuzz reads-with-key "$READS_URL" "${READS_FILTER[@]}" -H "Authorization: Bearer $KEY"
fuzz writes-without-key "$WRITES_URL" "${WRITES_FILTER[@]}"
fuzz writes-with-key "$WRITES_KEY_URL" "${WRITES_FILTER[@]}" -H "Authorization: Bearer $KEY"

echo
echo "=== summary (MAX_EXAMPLES=$MAX_EXAMPLES, SEED=$SEED; reports and server logs in $REPORT_DIR)"
for line in "${RESULTS[@]}"; do echo "- $line"; done
exit "$FAILED"
