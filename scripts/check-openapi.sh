#!/usr/bin/env bash
# Runs schemathesis with every check (positive data acceptance included)
# against a real ingest: the OpenAPI document must describe what the service
# really accepts and answers, or this fails.
#
# Ingest runs from the debug binary of the target directory (build it first:
# `cargo build --workspace --bins`), on a free port, with a fresh database of
# the machine's PostgreSQL that is dropped afterwards, beside a processor
# (which `GET /v1/jobs/{id}` and `POST /v1/jobs/{id}/cancel` ask) and the
# broker (started if none runs, and stopped again, as scripts/test.sh does).
#
# schemathesis is installed once, pinned, into a virtualenv in the cache
# directory (ONCEFLOW_SCHEMATHESIS_VENV overrides it); later runs are offline.
#
#   scripts/check-openapi.sh [extra schemathesis arguments]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

readonly SCHEMATHESIS_VERSION=4.32.5
venv="${ONCEFLOW_SCHEMATHESIS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/onceflow/st-venv}"
if [[ "$("$venv/bin/schemathesis" --version 2>/dev/null)" != *"$SCHEMATHESIS_VERSION"* ]]; then
  say "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

ensure_postgres
ensure_broker memory
binary="$TARGET_DIR/debug/onceflow-ingest"
processor_binary="$TARGET_DIR/debug/onceflow-processor"
for b in "$binary" "$processor_binary"; do
  [ -x "$b" ] || { echo "check-openapi: $b is missing; run cargo build --workspace --bins" >&2; exit 2; }
done

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"
processor_port="$(free_port)"
database="onceflow_openapi_check_$$"
processor_database="onceflow_openapi_check_processor_$$"
log="$(mktemp)"
processor_log="$(mktemp)"
cleanup() {
  [ -n "${ingest_pid:-}" ] && kill "$ingest_pid" 2>/dev/null && wait "$ingest_pid" 2>/dev/null
  [ -n "${processor_pid:-}" ] && kill "$processor_pid" 2>/dev/null && wait "$processor_pid" 2>/dev/null
  for db in "$database" "$processor_database"; do
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -f "$log" "$processor_log"
  if [ "$BROKER_STARTED" = 1 ]; then stop_pid_file "$STACK_DIR/broker.pid"; fi
}
trap cleanup EXIT

# The processor, which ingest asks about executions and cancellations.
env ONCEFLOW_LISTEN="127.0.0.1:$processor_port" \
  ONCEFLOW_DATABASE__URL="postgres://postgres@$PG_HOST:$PG_PORT/$processor_database" \
  ONCEFLOW_KAFKA__BROKERS="$BROKER_ADDR" \
  ONCEFLOW_KAFKA__TOPIC_PREFIX="openapi-check-$$." \
  ONCEFLOW_TELEMETRY__LOG_FILTER=warn \
  "$processor_binary" --config "$ROOT/config/development/processor.toml" >"$processor_log" 2>&1 &
processor_pid=$!
wait_for_port "127.0.0.1:$processor_port" 60 || { cat "$processor_log" >&2; exit 1; }

env ONCEFLOW_LISTEN="127.0.0.1:$port" \
  ONCEFLOW_DATABASE__URL="postgres://postgres@$PG_HOST:$PG_PORT/$database" \
  ONCEFLOW_KAFKA__BROKERS="$BROKER_ADDR" \
  ONCEFLOW_KAFKA__TOPIC_PREFIX="openapi-check-$$." \
  ONCEFLOW_TELEMETRY__LOG_FILTER=warn \
  ONCEFLOW_EXECUTION_STATUS_URL="http://127.0.0.1:$processor_port" \
  "$binary" --config "$ROOT/config/development/ingest.toml" >"$log" 2>&1 &
ingest_pid=$!
wait_for_port "127.0.0.1:$port" 60 || { cat "$log" >&2; exit 1; }

say "schemathesis $SCHEMATHESIS_VERSION, every check, against ingest on :$port"
# A fresh Idempotency-Key for every generated first request (see the hooks file).
ONCEFLOW_SCHEMATHESIS_API_KEY=dev-onceflow-key SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH="$ROOT/scripts" \
  "$venv/bin/schemathesis" --config-file "$ROOT/scripts/schemathesis.toml" run "http://127.0.0.1:$port/openapi.json" \
  --checks all \
  --max-examples "${ONCEFLOW_SCHEMATHESIS_EXAMPLES:-100}" \
  --seed 1 \
  "$@" || { echo "--- ingest log ---" >&2; tail -n 50 "$log" >&2; exit 1; }
