#!/usr/bin/env bash
# The benchmark of the running stack, from outside, in one command.
#
#   scripts/bench.sh            everything, then one table of figures and ratios
#   ONCEFLOW_BENCH_QUICK=1 scripts/bench.sh   shorter runs and fewer subscribers
#
# 1. Raw baselines: pgbench runs the processor's and ingest's own per-command
#    transactions (the same statements the services issue), 16 clients, on
#    fresh databases migrated by the services' own `migrate` command.
# 2. The release stack is (re)started with scripts/stack.sh and measured
#    through its public HTTP and SSE interfaces by the Rust load client
#    `onceflow-bench`: ingest 202/s with fresh keys, processor drain rate,
#    accept -> SSE latency at fixed rates, idle SSE subscribers' memory, and
#    SSE fan-out; and for a push handler (`bench.noop`, served by the load
#    client itself), 202 -> handler request latency and the drain of a
#    backlog. The services run with exactly the configuration
#    `scripts/stack.sh up` gives them.
#
# Figures go to .stack/bench/*.json; the table is printed at the end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

quick="${ONCEFLOW_BENCH_QUICK:-0}"
seconds=$([ "$quick" = 1 ] && echo 5 || echo 15)
# The ledger's backlog: what a 15-s burst queues at ingest's rate.
backlog=$([ "$quick" = 1 ] && echo 1000 || echo 35000)
handler_backlog=$([ "$quick" = 1 ] && echo 1000 || echo 5000)
idle_subscribers=$([ "$quick" = 1 ] && echo 2000 || echo 20000)
fanout_subscribers=$([ "$quick" = 1 ] && echo 200 || echo 2000)
fanout_events=$([ "$quick" = 1 ] && echo 200 || echo 1000)
# Deposits are spread over this many accounts (bench-0 ...), in the stack and
# in the processor's baseline alike: keys spread over the partitions, so the
# processor's lanes work in parallel as they would for many customers (every
# deposit still updates the one world:EUR account).
accounts=8
out="$STACK_DIR/bench"
mkdir -p "$out"
rm -f "$out"/*.json
# Idle subscribers need as many descriptors in the notifier and the client:
# raise the soft limit to the hard one, and stay 1,000 below it (this
# machine's hard limit is 20,000, so the full run measures 19,000).
ulimit -n "$(ulimit -Hn)"
max_subscribers=$(( $(ulimit -n) - 1000 ))
(( idle_subscribers > max_subscribers )) && idle_subscribers=$max_subscribers

ensure_build_dependencies
ensure_postgres
say "building the release binaries"
# The services as scripts/stack.sh builds them, the load client apart: built
# together, the crates they share would be built with other features, and
# stack.sh would build the services again.
cargo build --release --locked -p onceflow-ingest -p onceflow-processor -p onceflow-notifier
cargo build --release --locked -p onceflow-bench
bench_binary="$TARGET_DIR/release/onceflow-bench"
bench() { "$bench_binary" --accounts "$accounts" "$@"; }
psql_admin() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

# --- 1. raw baselines -------------------------------------------------------
baseline() { # name service script
  local name="$1" service="$2" script="$3" db="onceflow_bench_baseline_$1"
  psql_admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  ONCEFLOW_DATABASE__URL="postgres://postgres@$PG_HOST:$PG_PORT/$db" \
    "$TARGET_DIR/release/onceflow-$service" migrate >/dev/null
  # The accounts, and the system account their first deposit would create.
  psql_admin -d "$db" -c "INSERT INTO accounts (tenant, account_id, currency)
      SELECT 'dev', 'bench-' || a, 'EUR' FROM generate_series(0, $accounts - 1) a
      UNION ALL SELECT 'dev', 'world:EUR', 'EUR'" 2>/dev/null || true
  say "pgbench: $name per-command transaction, 16 clients, ${seconds}s"
  pgbench -h "$PG_HOST" -p "$PG_PORT" -U postgres -n -c 16 -j 2 -T "$seconds" -D accounts="$accounts" -f "$script" "$db" \
    | tee "$out/pgbench-$name.txt" | grep -E '^tps' || true
  tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out/pgbench-$name.txt" | head -n 1)"
  echo "{\"baseline\": {\"name\": \"$name\", \"tps\": $tps}}" >"$out/baseline-$name.json"
  psql_admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
}
baseline processor processor scripts/bench/processor-transaction.sql
baseline ingest ingest scripts/bench/ingest-transaction.sql

# --- 2. the running stack ----------------------------------------------------
# The stack as `scripts/stack.sh up` runs it: its broker keeps topics in
# memory by default; ONCEFLOW_BROKER_STORAGE=persistent measures the SQLite
# file it keeps them in on request (see the README: "The broker's storage").
export ONCEFLOW_BROKER_STORAGE="${ONCEFLOW_BROKER_STORAGE:-memory}"
say "restarting the release stack (scripts/stack.sh, $ONCEFLOW_BROKER_STORAGE broker)"
scripts/stack.sh down >/dev/null 2>&1 || true
scripts/stack.sh up >/dev/null
bench setup >"$out/setup.json"
sleep 3

# Ingest's own capacity, like for like with its pgbench baseline (which runs
# alone): the processor stopped, so the two do not share the 2 cores, and
# backpressure lifted, since what ingest accepts here piles up undrained
# (backpressure's own figures are the overload phase's). The processor drains
# the pile once restarted; each latency phase waits for the stack to settle.
say "ingest: 202/s with fresh keys, 16 connections, ${seconds}s (processor stopped, backpressure lifted)"
scripts/stack.sh stop processor
scripts/stack.sh stop ingest
ONCEFLOW_SHED__MIN_LAG=1000000000 scripts/stack.sh start ingest >/dev/null
bench accept --connections 16 --seconds "$seconds" | tee "$out/accept.json"
scripts/stack.sh stop ingest
scripts/stack.sh start ingest >/dev/null
scripts/stack.sh start processor >/dev/null

for rate in 10 100 200; do
  say "accept -> SSE latency at $rate commands/s, ${seconds}s"
  bench latency --rate "$rate" --seconds "$seconds" | tee "$out/latency-$rate.json"
done

say "processor drain: $backlog deposits queued while it is stopped, then drained"
# Ingest's backpressure refuses a backlog that nothing drains (that is its
# job); lift it while the backlog is queued, which changes nothing of the
# processor being measured, and put it back afterwards.
scripts/stack.sh stop processor
scripts/stack.sh stop ingest
ONCEFLOW_SHED__MIN_LAG=1000000000 scripts/stack.sh start ingest >/dev/null
bench submit --count "$backlog" >"$out/submit.json"
scripts/stack.sh stop ingest
scripts/stack.sh start ingest >/dev/null
bench drain --count "$backlog" >"$out/drain.json" &
drain_pid=$!
sleep 2
scripts/stack.sh start processor
wait "$drain_pid"
cat "$out/drain.json"

# Twice what the processor drains, for long enough that its backlog would
# take longer than shed.max_queue_delay_ms to drain: ingest must refuse
# (429 + Retry-After: the bench is the one tenant making the backlog) what it cannot take, and what it accepts must still
# reach its client within a bounded time.
overload_rate="$(python3 -c 'import json,sys; print(max(20, round(2 * json.load(open(sys.argv[1]))["drain"]["per_sec"])))' "$out/drain.json" 2>/dev/null || echo 1000)"
overload_seconds=$([ "$quick" = 1 ] && echo 10 || echo 30)
say "overload: accept -> SSE at twice the drain rate ($overload_rate commands/s), ${overload_seconds}s"
bench latency --rate "$overload_rate" --seconds "$overload_seconds" | tee "$out/overload.json"

say "push handler: 202 -> handler request latency at 100 commands/s, ${seconds}s"
bench handler-latency --rate 100 --seconds "$seconds" | tee "$out/handler-latency.json"

say "push handler drain: $handler_backlog bench.noop commands queued while the processor is stopped, then drained"
scripts/stack.sh stop processor
scripts/stack.sh stop ingest
ONCEFLOW_SHED__MIN_LAG=1000000000 scripts/stack.sh start ingest >/dev/null
bench submit --noop --count "$handler_backlog" >"$out/handler-submit.json"
scripts/stack.sh stop ingest
scripts/stack.sh start ingest >/dev/null
bench handler-drain --count "$handler_backlog" >"$out/handler-drain.json" &
drain_pid=$!
sleep 2
scripts/stack.sh start processor
wait "$drain_pid"
cat "$out/handler-drain.json"

# One key that cannot proceed must hold up only itself (last of the ledger
# phases: the 30-s transaction holds back vacuum, which slows the hot rows'
# updates for a while after it): another connection
# holds one account's row for 30 s (as a long transaction or a slow handler
# would), 200 deposits queue on that account, and the latency of the other
# accounts' deposits is measured meanwhile, to set beside the run above.
say "accept -> SSE at 100 commands/s again, the reference of the next figure, ${seconds}s"
bench latency --rate 100 --seconds "$seconds" | tee "$out/latency-reference.json"
say "one account locked 30 s with 200 deposits queued on it: accept -> SSE at 100/s on the others, ${seconds}s"
"$bench_binary" --account stuck --accounts 1 setup >/dev/null
sleep 2
psql_admin -d onceflow_processor -c "BEGIN" \
  -c "SELECT 1 FROM accounts WHERE tenant = 'dev' AND account_id = 'stuck-0' FOR UPDATE" \
  -c "SELECT pg_sleep(30)" -c "COMMIT" >/dev/null &
holder=$!
sleep 1
"$bench_binary" --account stuck --accounts 1 submit --count 200 >/dev/null
bench latency --rate 100 --seconds "$seconds" | tee "$out/latency-stuck.json"
wait "$holder"

say "idle SSE subscribers: $idle_subscribers"
bench idle --count "$idle_subscribers" --pid "$(cat "$STACK_DIR/notifier.pid")" | tee "$out/idle.json"

say "SSE fan-out: $fanout_subscribers subscribers x $fanout_events events"
bench fanout --subscribers "$fanout_subscribers" --events "$fanout_events" | tee "$out/fanout.json"

# --- the table ----------------------------------------------------------------
python3 - "$out" <<'PY'
import json, pathlib, sys, datetime, os
out = pathlib.Path(sys.argv[1])
f = {}
for path in out.glob("*.json"):
    for line in path.read_text().splitlines():
        if line.strip().startswith("{"):
            f[path.stem] = json.loads(line)
def get(name, *keys):
    value = f.get(name, {})
    for key in keys:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return value if not isinstance(value, dict) else None
def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"
proc_tps = get("baseline-processor", "baseline", "tps")
ingest_tps = get("baseline-ingest", "baseline", "tps")
accept = get("accept", "accept", "accepted_per_sec")
drain = get("drain", "drain", "per_sec")
rows = [
    ("ingest 202/s, 16 connections, fresh keys", f"{accept:.0f}/s (p50 {get('accept','accept','p50_ms'):.1f} ms; {sum(f.get('accept', {}).get('accept', {}).get('statuses', {}).get(s, 0) for s in ('429', '503'))} answered 429/503)" if accept else "n/a",
     f"pgbench ingest tx: {ingest_tps:.0f} tps" if ingest_tps else "n/a", ratio(accept, ingest_tps)),
    (f"processor drain, ledger.deposit, {get('drain', 'drain', 'events') or '?'} queued", f"{drain:.0f}/s" if drain else "n/a",
     f"pgbench processor tx: {proc_tps:.0f} tps" if proc_tps else "n/a", ratio(drain, proc_tps)),
]
for rate in (10, 100, 200):
    l = f.get(f"latency-{rate}", {}).get("latency", {})
    rows.append((f"accept -> SSE at {rate}/s", f"p50 {l.get('p50_ms', 0):.1f} ms, p99 {l.get('p99_ms', 0):.1f} ms (missing {l.get('missing', '?')})", "", ""))
stuck = f.get("latency-stuck", {}).get("latency", {})
reference = f.get("latency-reference", {}).get("latency", {})
if stuck:
    rows.append(("accept -> SSE at 100/s, one account locked 30 s with 200 deposits queued on it",
                 f"p50 {stuck.get('p50_ms', 0):.1f} ms, p99 {stuck.get('p99_ms', 0):.1f} ms (missing {stuck.get('missing', '?')})",
                 f"nothing locked, just before: p50 {reference.get('p50_ms', 0):.1f} ms, p99 {reference.get('p99_ms', 0):.1f} ms",
                 ratio(stuck.get('p50_ms'), reference.get('p50_ms')) + " (p50)"))
handler = f.get("handler-latency", {}).get("handler_latency", {})
if handler:
    rows.append(("push handler: 202 -> handler request at 100/s", f"p50 {handler.get('p50_ms', 0):.1f} ms, p99 {handler.get('p99_ms', 0):.1f} ms (missing {handler.get('missing', '?')})", "", ""))
handler_drain = get("handler-drain", "handler_drain", "per_sec")
if handler_drain:
    rows.append(("push handler drain, bench.noop (no-op handler)", f"{handler_drain:.0f}/s",
                 f"pgbench processor tx: {proc_tps:.0f} tps" if proc_tps else "n/a", ratio(handler_drain, proc_tps)))
over = f.get("overload", {}).get("latency", {})
if over:
    refused = sum(over.get("refused", {}).values())
    offered = over.get("accepted", 0) + refused
    rows.append((f"overload: accept -> SSE at 2x drain ({over.get('rate_per_sec')}/s)",
                 f"accepted {over.get('accepted')}: p50 {over.get('p50_ms', 0):.0f} ms, p99 {over.get('p99_ms', 0):.0f} ms, max {over.get('max_ms', 0):.0f} ms (missing {over.get('missing', '?')}); "
                 f"refused {refused} of {offered} ({100 * refused / max(offered, 1):.0f} %: {over.get('refused')})", "", ""))
idle = f.get("idle", {}).get("idle", {})
rows.append((f"idle SSE subscribers ({idle.get('subscribers', '?')})", f"{idle.get('kib_per_subscriber', 0):.1f} KiB each", "", ""))
fan = f.get("fanout", {}).get("fanout", {})
rows.append((f"SSE fan-out ({fan.get('subscribers', '?')} x {fan.get('events', '?')})", f"{fan.get('deliveries_per_sec', 0):,.0f} deliveries/s", "", ""))
print(f"\nonceflow benchmark, {datetime.date.today()}, {os.cpu_count()} cores, {os.environ.get('ONCEFLOW_BROKER_STORAGE', 'memory')} broker")
print("| figure | onceflow | raw baseline, same run | ratio |")
print("|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
PY
