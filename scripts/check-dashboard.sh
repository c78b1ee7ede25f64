#!/usr/bin/env bash
# CI: every query of the Grafana dashboard, evaluated by a real Prometheus
# (Debian's package, lib.sh: prometheus_tool) that scrapes the running local
# stack (scripts/stack.sh up: ingest, processor, notifier and the synthetic
# probe) after traffic went through it: deposits, a refused transfer, a
# statement, a push handler's command with a webhook to a local receiver, a
# cancelled job. A query that Prometheus refuses fails the check, and so does
# one that returns nothing, unless every metric it reads (or its panel) is
# named in deploy/grafana/may-be-empty.txt with why (what exists only after an
# event a healthy run does not have: a dead letter, an outage, shedding, a 5xx).
#
#   scripts/check-dashboard.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

PROMETHEUS_ADDR=127.0.0.1:9091
RECEIVER_PORT=9999
DEV_KEY=dev-onceflow-key
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  scripts/stack.sh down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

prometheus="$(prometheus_tool prometheus)" || { echo "check-dashboard: no prometheus binary" >&2; exit 1; }

say "the local stack (scripts/stack.sh up)"
scripts/stack.sh up >"$work/stack.log" 2>&1 || { tail -40 "$work/stack.log" >&2; exit 1; }

# A webhook receiver that answers 204 (the stack lets callbacks reach
# 127.0.0.1:$RECEIVER_PORT only).
python3 - "$RECEIVER_PORT" >"$work/receiver.log" 2>&1 <<'PY' &
import http.server, sys
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
PY
pids+=($!)

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 2s
scrape_configs:
  - {job_name: ingest, static_configs: [{targets: ["127.0.0.1:8080"]}]}
  - {job_name: processor, static_configs: [{targets: ["127.0.0.1:8081"]}]}
  - {job_name: notifier, static_configs: [{targets: ["127.0.0.1:8082"]}]}
  - {job_name: probe, static_configs: [{targets: ["127.0.0.1:9464"]}]}
EOF
"$prometheus" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="$PROMETHEUS_ADDR" >"$work/prometheus.log" 2>&1 &
pids+=($!)
wait_for_port "$PROMETHEUS_ADDR" 30

say "traffic through the stack"
submit() {
  curl -fsS -o /dev/null -X POST http://127.0.0.1:8080/v1/commands -H "authorization: Bearer $DEV_KEY" \
    -H "idempotency-key: dashboard-$1-$RANDOM$RANDOM" -H 'content-type: application/json' -d "$2"
}
submit open-a '{"type":"ledger.open_account","payload":{"account_id":"dash-a","currency":"EUR"}}'
submit open-b '{"type":"ledger.open_account","payload":{"account_id":"dash-b","currency":"EUR"}}'
sleep 2
# Deposits 16 at a time, so the processor meets them in batches.
for round in 0 1 2 3 4; do
  deposits=()
  for n in $(seq $((round * 16 + 1)) $((round * 16 + 16))); do
    submit "deposit-$n" "{\"type\":\"ledger.deposit\",\"payload\":{\"account_id\":\"dash-a\",\"amount\":$n}}" &
    deposits+=($!)
  done
  wait "${deposits[@]}"
done
submit refused '{"type":"ledger.transfer","payload":{"from":"dash-b","to":"dash-a","amount":1000000}}'
submit statement '{"type":"ledger.statement","payload":{"account_id":"dash-a"}}'
submit greet "{\"type\":\"demo.greet\",\"payload\":{\"name\":\"Ada\"},\"callback_url\":\"http://127.0.0.1:$RECEIVER_PORT/hooks\"}"
card="$(curl -fsS -X POST http://127.0.0.1:8080/v1/commands -H "authorization: Bearer $DEV_KEY" \
  -H "idempotency-key: dashboard-card-$RANDOM$RANDOM" -H 'content-type: application/json' \
  -d '{"type":"demo.card","payload":{"name":"Ada"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')"
# Cancelled while its handler draws it (409 until the processor recorded it).
for _ in $(seq 1 20); do
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:8080/v1/jobs/$card/cancel" -H "authorization: Bearer $DEV_KEY" \
    2>/dev/null && break
  sleep 0.5
done
# An SSE reader for a while, so the stream gauges have a subscriber.
curl -sS -N --max-time 20 -H "authorization: Bearer $DEV_KEY" http://127.0.0.1:8082/v1/events >/dev/null 2>&1 &
pids+=($!)
# Scrapes after the traffic, for rates over a minute's window.
sleep 25

say "evaluating every dashboard query against Prometheus"
python3 - "$PROMETHEUS_ADDR" deploy/grafana/dashboards deploy/grafana/may-be-empty.txt <<'PY'
import json, os, re, sys, urllib.parse, urllib.request

address, dashboards, may_be_empty_file = sys.argv[1:4]
# A metric name, or a panel's title in double quotes (with /refId after it for
# one query of the panel), then why.
may_be_empty, panels_may_be_empty = {}, {}
for line in open(may_be_empty_file, encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if line.startswith('"'):
        title, _, rest = line[1:].partition('"')
        ref_id, _, why = rest[1:].partition(" ") if rest.startswith("/") else ("", "", rest)
        panels_may_be_empty[(title, ref_id)] = why.strip()
    elif line:
        name, _, why = line.partition(" ")
        may_be_empty[name] = why.strip()

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "le", "inf", "nan"}

def metrics(expr):
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set(re.findall(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n
            for n in names if n.lower() not in KEYWORDS}

def exprs(node, title=None):
    if isinstance(node, dict):
        title = node.get("title", title)
        if isinstance(node.get("expr"), str):
            yield title, node.get("refId", ""), node["expr"]
        for value in node.values():
            yield from exprs(value, title)
    elif isinstance(node, list):
        for value in node:
            yield from exprs(value, title)

failures, empty_allowed, answered = [], [], 0
for file in sorted(os.listdir(dashboards)):
    if not file.endswith(".json"):
        continue
    for title, ref_id, expr in exprs(json.load(open(os.path.join(dashboards, file), encoding="utf-8"))):
        query = expr.replace("$__rate_interval", "1m")
        url = f"http://{address}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        try:
            answer = json.load(urllib.request.urlopen(url, timeout=10))
        except urllib.error.HTTPError as error:
            failures.append(f"{title!r}: Prometheus refused `{expr}`: {error.read().decode(errors='replace')}")
            continue
        if answer.get("status") != "success":
            failures.append(f"{title!r}: `{expr}`: {answer}")
        elif answer["data"]["result"]:
            answered += 1
        else:
            names = metrics(expr)
            panel_allowed = (title, "") in panels_may_be_empty or (title, ref_id) in panels_may_be_empty
            if panel_allowed or (names and all(name in may_be_empty for name in names)):
                empty_allowed.append(title)
            else:
                unlisted = sorted(name for name in names if name not in may_be_empty)
                failures.append(f"{title!r}: `{expr}` returned nothing after traffic (not in may-be-empty: {unlisted})")

for failure in failures:
    print(f"check-dashboard: {failure}", file=sys.stderr)
print(f"check-dashboard: {answered} queries answered with data, {len(empty_allowed)} empty as allowed "
      f"(metrics made only by events a healthy run lacks), {len(failures)} failed")
sys.exit(1 if failures else 0)
PY
