#!/usr/bin/env bash
# Runs every test: unit tests, and the integration and end-to-end tests against
# the real PostgreSQL and the real broker (started here if none is running, and
# stopped again afterwards). Extra arguments go to `cargo test`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_build_dependencies
ensure_postgres
ensure_broker memory

export ONCEFLOW_TEST_KAFKA_BROKERS="$BROKER_ADDR"
export ONCEFLOW_TEST_DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT"
# The crash tests run the service binaries as real processes (and SIGKILL
# them); they find them in the target directory, so build them first.
say "cargo build --workspace --bins"
cargo build --workspace --bins --locked
say "cargo test --workspace"
log="$(mktemp)"
cleanup() {
  rm -f "$log"
  if [ "$BROKER_STARTED" = 1 ]; then stop_pid_file "$STACK_DIR/broker.pid"; fi
}
trap cleanup EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for every test binary together (cargo prints one per binary).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "summary: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
