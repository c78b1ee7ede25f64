#!/usr/bin/env bash
# The local stack: the broker, PostgreSQL databases and the three services.
#
#   scripts/stack.sh up      build, start what is not running (the example push
#                            handler of examples/python too), wait until ready,
#                            show a ledger command and a command of the example
#                            handler going through, print the URLs
#   scripts/stack.sh down    stop the services and the broker this script started
#   scripts/stack.sh status  what is running
#   scripts/stack.sh stop|start SERVICE   one service of a stack that is up
#
# Running `up` twice is harmless: running parts are left alone. Logs and pid
# files live in .stack/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

SERVICES=(ingest processor notifier)
DEV_API_KEY="dev-onceflow-key"
# The one port a local webhook receiver may use (see `up`).
RECEIVER_PORT=9999
# The example push handler (examples/python/handler.py) serving demo.greet,
# declared in config/development/command-types.toml.
HANDLER_PORT=8090
# The synthetic probe (`onceflow probe --every 60`): its tenant's key and
# where it serves its metrics.
PROBE_API_KEY="probe-onceflow-key"
PROBE_METRICS=127.0.0.1:9464
COMMAND_TYPES="$ROOT/config/development/command-types.toml"

port_of() {
  case "$1" in ingest) echo 8080 ;; processor) echo 8081 ;; notifier) echo 8082 ;; esac
}

running() {
  [ -f "$STACK_DIR/$1.pid" ] && kill -0 "$(cat "$STACK_DIR/$1.pid")" 2>/dev/null
}

wait_ready() {
  local name="$1" url="http://127.0.0.1:$(port_of "$1")/readyz"
  for _ in $(seq 600); do
    if curl -fsS "$url" >/dev/null 2>&1; then return 0; fi
    if ! running "$name"; then
      echo "$name exited; last lines of .stack/$name.log:" >&2
      tail -n 20 "$STACK_DIR/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "$name not ready after 60s (see .stack/$name.log)" >&2
  return 1
}

demo() {
  local key="demo-$(date +%s)-$RANDOM" account="demo$RANDOM" body job
  say "showing one command going through: open account $account"
  body="{\"type\":\"ledger.open_account\",\"payload\":{\"account_id\":\"$account\",\"currency\":\"EUR\"}}"
  curl -sS -X POST http://127.0.0.1:8080/v1/commands \
    -H "Authorization: Bearer $DEV_API_KEY" -H "Idempotency-Key: $key" \
    -H 'Content-Type: application/json' -d "$body" | tee "$STACK_DIR/demo.json"
  echo
  job="$(sed -n 's/.*"job_id":"\([^"]*\)".*/\1/p' "$STACK_DIR/demo.json")"
  say "waiting for its result (a first consumer-group join on the broker can take ~30 s)"
  for _ in $(seq 120); do
    if curl -sS "http://127.0.0.1:8080/v1/jobs/$job" -H "Authorization: Bearer $DEV_API_KEY" \
      | tee "$STACK_DIR/demo-status.json" | grep -q '"status":"succeeded"'; then
      cat "$STACK_DIR/demo-status.json"
      echo
      say "streamed by the notifier:"
      curl -sSN --max-time 5 "http://127.0.0.1:8082/v1/jobs/$job/events" \
        -H "Authorization: Bearer $DEV_API_KEY" || true
      demo_handler && demo_long_work
      return
    fi
    sleep 1
  done
  echo "the demo command did not finish within 120 s; see .stack/*.log" >&2
  return 1
}

# Submit a command of type $1 (name: Ada) served by the Python example
# handler, say $2 before its events, and check they hold $3.
demo_own_type() {
  local type="$1" heading="$2" expected="$3" key job
  key="$type-$(date +%s)-$RANDOM"
  curl -sS -X POST http://127.0.0.1:8080/v1/commands \
    -H "Authorization: Bearer $DEV_API_KEY" -H "Idempotency-Key: $key" \
    -H 'Content-Type: application/json' -d "{\"type\":\"$type\",\"payload\":{\"name\":\"Ada\"}}" \
    | tee "$STACK_DIR/demo-$type.json"
  echo
  job="$(sed -n 's/.*"job_id":"\([^"]*\)".*/\1/p' "$STACK_DIR/demo-$type.json")"
  say "$heading"
  curl -sSN --max-time 30 "http://127.0.0.1:8082/v1/jobs/$job/events" \
    -H "Authorization: Bearer $DEV_API_KEY" | tee "$STACK_DIR/demo-$type-events.txt" || true
  if ! grep -q "$expected" "$STACK_DIR/demo-$type-events.txt"; then
    echo "the $type command did not succeed within 30 s; see .stack/handler.log and .stack/processor.log" >&2
    return 1
  fi
}

# A command of your own kind: demo.greet, served over HTTP by the Python
# example handler.
demo_handler() {
  say "your own command type: demo.greet, served by examples/python/handler.py"
  demo_own_type demo.greet "streamed by the notifier once the handler answered:" 'Hello, Ada!'
}

# Long work: demo.card, which the Python handler answers 202 and completes
# later through the attempt's callbacks, heartbeating its progress.
demo_long_work() {
  say "long work: demo.card, answered 202 by the handler and completed later through its callbacks"
  demo_own_type demo.card "its progress (heartbeats) and its result, streamed by the notifier:" 'A card for Ada'
}

# Start the example push handler unless it runs.
start_handler() {
  if [ -f "$STACK_DIR/handler.pid" ] && kill -0 "$(cat "$STACK_DIR/handler.pid")" 2>/dev/null; then
    say "the example handler already runs (pid $(cat "$STACK_DIR/handler.pid"))"
    return 0
  fi
  local venv
  venv="$(ensure_python_examples)"
  HANDLER_PORT="$HANDLER_PORT" nohup "$venv/bin/python" "$ROOT/examples/python/handler.py" \
    >>"$STACK_DIR/handler.log" 2>&1 &
  echo $! >"$STACK_DIR/handler.pid"
  say "started the example handler (pid $!, port $HANDLER_PORT, log .stack/handler.log)"
  wait_for_port "127.0.0.1:$HANDLER_PORT" 30
}

# Start the release binary of service $1 unless it runs (built by `up`).
start_service() {
  local name="$1"
  if running "$name"; then
    say "$name already running (pid $(cat "$STACK_DIR/$name.pid"))"
    return 0
  fi
  # Ingest and the notifier take the development tenant `dev` (and its
  # webhook secret) from config/development/: no tenant is built in.
  local config=()
  if [ -f "$ROOT/config/development/$name.toml" ]; then
    config=(--config "$ROOT/config/development/$name.toml")
  fi
  "$TARGET_DIR/release/onceflow-$name" "${config[@]}" migrate >>"$STACK_DIR/$name.log" 2>&1
  # The local stack runs no webhook receiver of its own; yours, on this
  # machine, must listen on port $RECEIVER_PORT: callbacks may reach
  # 127.0.0.1 and ::1 (which SSRF protection refuses by default) on that
  # port only, so they cannot reach the services, PostgreSQL or the broker.
  ONCEFLOW_KAFKA__BROKERS="$BROKER_ADDR" ONCEFLOW_WEBHOOKS__ALLOWLIST="[\"127.0.0.1:$RECEIVER_PORT\", \"[::1]:$RECEIVER_PORT\"]" \
    ONCEFLOW_COMMAND_TYPES_FILE="$COMMAND_TYPES" \
    nohup "$TARGET_DIR/release/onceflow-$name" "${config[@]}" serve \
    >>"$STACK_DIR/$name.log" 2>&1 &
  echo $! >"$STACK_DIR/$name.pid"
  say "started $name (pid $!, log .stack/$name.log)"
}

# The synthetic probe: one `onceflow.probe` command through the whole stack
# every 60 s, its metrics (onceflow_probe_*) on $PROBE_METRICS.
start_probe() {
  if [ -f "$STACK_DIR/probe.pid" ] && kill -0 "$(cat "$STACK_DIR/probe.pid")" 2>/dev/null; then
    return 0
  fi
  ONCEFLOW_API_KEY="$PROBE_API_KEY" nohup "$TARGET_DIR/release/onceflow" probe --every 60 \
    --metrics-listen "$PROBE_METRICS" >>"$STACK_DIR/probe.log" 2>&1 &
  echo $! >"$STACK_DIR/probe.pid"
  say "started the synthetic probe (pid $!, metrics http://$PROBE_METRICS/metrics, log .stack/probe.log)"
}

up() {
  mkdir -p "$STACK_DIR"
  ensure_postgres
  # The broker keeps its topics in memory (the fastest, see the README: "The
  # broker's storage"); ONCEFLOW_BROKER_STORAGE=persistent keeps them in
  # .stack/broker.db across `down`, `up` and a crash.
  ensure_broker "${ONCEFLOW_BROKER_STORAGE:-memory}"
  ensure_build_dependencies
  say "building the services (release)"
  cargo build --release --locked -p onceflow-ingest -p onceflow-processor -p onceflow-notifier -p onceflow-cli
  start_handler
  for name in "${SERVICES[@]}"; do start_service "$name"; done
  for name in "${SERVICES[@]}"; do wait_ready "$name"; done
  start_probe
  demo
  cat <<EOF2

onceflow is up.
  ingest     http://127.0.0.1:8080   (POST /v1/commands, GET /v1/jobs/{id})
  processor  http://127.0.0.1:8081   (/livez /readyz /metrics)
  notifier   http://127.0.0.1:8082   (GET /v1/events, GET /v1/jobs/{id}/events)
  broker     $BROKER_ADDR
  API key    $DEV_API_KEY            (tenant "dev")
  webhooks   callback_url may point at http://127.0.0.1:$RECEIVER_PORT/... (your receiver)
  handler    http://127.0.0.1:$HANDLER_PORT/greet  (examples/python/handler.py, serving demo.greet and demo.card)
  worker     pull type demo.report: run examples/typescript (see the README's "Long work")
  probe      onceflow probe every 60 s (tenant "probe"), metrics http://$PROBE_METRICS/metrics
Stop it with: scripts/stack.sh down
EOF2
}

# With the in-memory broker, what is still on its topics when it stops is
# lost: give the commands and results in flight up to 30 s to get through
# (every service's outbox empty, every consumer caught up) before stopping.
drain_before_stop() {
  [ "$(cat "$STACK_DIR/broker.storage" 2>/dev/null)" = memory ] && running processor || return 0
  local left=0
  for _ in $(seq 60); do
    left=0
    for name in "${SERVICES[@]}"; do
      local metrics
      metrics="$(curl -fsS --max-time 2 "http://127.0.0.1:$(port_of "$name")/metrics" 2>/dev/null)" || continue
      left=$((left + $(awk '/^onceflow_(outbox_backlog|kafka_consumer_lag_messages)[ {]/ { sum += $NF } END { printf "%d", sum }' <<<"$metrics")))
    done
    [ "$left" = 0 ] && return 0
    sleep 0.5
  done
  say "$left commands and results were still on their way; the in-memory broker loses them (ONCEFLOW_BROKER_STORAGE=persistent keeps them)"
}

down() {
  drain_before_stop
  for name in "${SERVICES[@]}"; do
    if running "$name"; then say "stopping $name"; fi
    stop_pid_file "$STACK_DIR/$name.pid"
  done
  if [ -f "$STACK_DIR/handler.pid" ]; then say "stopping the example handler"; fi
  stop_pid_file "$STACK_DIR/handler.pid"
  if [ -f "$STACK_DIR/probe.pid" ]; then say "stopping the synthetic probe"; fi
  stop_pid_file "$STACK_DIR/probe.pid"
  if [ -f "$STACK_DIR/broker.pid" ]; then
    say "stopping the broker"
    rm -f "$STACK_DIR/broker.storage"
  fi
  stop_pid_file "$STACK_DIR/broker.pid"
}

status() {
  for name in "${SERVICES[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$STACK_DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if port_open "127.0.0.1:$HANDLER_PORT"; then echo "handler: listening on 127.0.0.1:$HANDLER_PORT"; else echo "handler: stopped"; fi
  if port_open "$PROBE_METRICS"; then echo "probe: metrics on $PROBE_METRICS"; else echo "probe: stopped"; fi
  if port_open "$BROKER_ADDR"; then
    echo "broker: listening on $BROKER_ADDR ($(cat "$STACK_DIR/broker.storage" 2>/dev/null || echo "not started by this script") storage)"
  else
    echo "broker: stopped"
  fi
}

service_arg() {
  case "${1:-}" in
    ingest | processor | notifier) ;;
    *) echo "usage: $0 start|stop ingest|processor|notifier" >&2; exit 2 ;;
  esac
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  # One service of a stack that is up, e.g. to see the others ride out its absence.
  stop) service_arg "${2:-}"; stop_pid_file "$STACK_DIR/$2.pid" ;;
  start) service_arg "${2:-}"; start_service "$2"; wait_ready "$2" ;;
  *) echo "usage: $0 [up|down|status|start SERVICE|stop SERVICE]" >&2; exit 2 ;;
esac
