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
export ONCEFLOW_TEST_PYTHON="$venv/bin/python"
run_ignored_e2e python_ "the Python examples against the real stack"
