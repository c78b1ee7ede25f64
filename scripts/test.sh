#!/usr/bin/env bash
# Runs every test: unit tests, and the integration and end-to-end tests against
# the real PostgreSQL and the real broker (started here if none is running, and
# stopped again afterwards). Extra arguments go to `cargo test`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_postgres
ensure_broker
if [ "$BROKER_STARTED" = 1 ]; then
  trap 'stop_pid_file "$STACK_DIR/broker.pid"' EXIT
fi

export ONCEFLOW_TEST_KAFKA_BROKERS="$BROKER_ADDR"
export ONCEFLOW_TEST_DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT"
say "cargo test --workspace"
cargo test --workspace --locked "$@"
