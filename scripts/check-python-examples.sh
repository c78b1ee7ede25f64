#!/usr/bin/env bash
# The Python examples against the real stack: the results-topic consumer
# (examples/python/results_consumer.py: confluent-kafka and fastavro), the
# webhook receiver (examples/python/webhook_receiver.py: the standardwebhooks
# library) and the push handler (examples/python/handler.py: the standard
# library and standardwebhooks). Makes their virtual environment from the pinned
# examples/python/requirements.txt (once; later runs reuse it), then runs the
# end-to-end tests in which the real services publish results and POST
# webhooks, and the examples decode and verify them with no onceflow code.
# Starts the broker if none is running (and stops it again), like
# scripts/test.sh.
#
# Environment: ONCEFLOW_PY_VENV overrides the environment's directory
# (default: ${XDG_CACHE_HOME:-$HOME/.cache}/onceflow/py-venv).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

venv="$(ensure_python_examples)"
ensure_build_dependencies
ensure_postgres
ensure_broker memory
trap 'if [ "$BROKER_STARTED" = 1 ]; then stop_pid_file "$STACK_DIR/broker.pid"; fi' EXIT

export ONCEFLOW_TEST_KAFKA_BROKERS="$BROKER_ADDR"
export ONCEFLOW_TEST_DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT"
export ONCEFLOW_TEST_PYTHON="$venv/bin/python"
say "cargo test: the Python examples against the real stack"
cargo test -p onceflow-tests --test e2e --locked python_ -- --ignored
