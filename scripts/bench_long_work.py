#!/usr/bin/env python3
"""How fast onceflow hands out new pull tasks while thousands are in flight.

Against the running local stack (scripts/stack.sh up), from outside, with the
development API key and worker key: the latency from a command's 202 to its
task in a waiting worker's poll, for PROBES commands one at a time, first with
nothing in flight, then with IN_FLIGHT tasks of the same type leased and held
(no heartbeat needed: bench.hold's lease is 30 minutes); then it completes
every held task. Prints a table; the ratio is loaded p50 / idle p50.

Run: python3 scripts/bench_long_work.py [IN_FLIGHT=10000] [PROBES=200]
(the standard library only).
"""
import concurrent.futures
import json
import statistics
import sys
import time
import urllib.request
import uuid

INGEST = "http://127.0.0.1:8080"
PROCESSOR = "http://127.0.0.1:8081"
API_KEY = "dev-onceflow-key"
WORKER_KEY = "dev-worker-key"
IN_FLIGHT = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
PROBES = int(sys.argv[2]) if len(sys.argv) > 2 else 200
RUN = uuid.uuid4().hex[:8]


def post(url, body, token, headers=None):
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST", headers={
        "authorization": f"Bearer {token}", "content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def submit(key):
    status, body = post(f"{INGEST}/v1/commands", {"type": "bench.hold", "payload": {"key": key}}, API_KEY,
                        {"idempotency-key": f"{RUN}-{key}"})
    assert status == 202, (status, body)


def poll(max_tasks, wait_ms):
    status, body = post(f"{PROCESSOR}/v1/workers/poll",
                        {"types": ["bench.hold"], "max_tasks": max_tasks, "wait_ms": wait_ms}, WORKER_KEY)
    assert status == 200, (status, body)
    return body["tasks"]


def complete(task):
    status, body = post(task["callbacks"]["complete"], {"result": None}, task["callbacks"]["token"])
    assert status == 200, (status, body)


def probe(label):
    """202 -> task latencies (ms) of PROBES commands, one at a time."""
    latencies = []
    with concurrent.futures.ThreadPoolExecutor(1) as waiting:
        for n in range(PROBES):
            polled = waiting.submit(poll, 1, 10_000)
            time.sleep(0.02)  # the poll is waiting before the command comes
            started = time.perf_counter()
            submit(f"probe-{label}-{n}")
            tasks = polled.result()
            assert tasks, "no task within 10 s"
            latencies.append((time.perf_counter() - started) * 1000)
            complete(tasks[0])
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]


def main():
    for _ in iter(lambda: poll(64, 0), []):
        pass  # nothing of an earlier run left ready
    idle = probe("idle")
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(submit, (f"held-{n}" for n in range(IN_FLIGHT))))
    held = []
    while len(held) < IN_FLIGHT:
        held.extend(poll(64, 5_000))
    print(f"{IN_FLIGHT} submitted and leased in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    loaded = probe("loaded")
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(complete, held))
    print(f"| executions in flight | 202 -> task p50 | p99 |\n|---|---|---|")
    print(f"| 0 | {idle[0]:.1f} ms | {idle[1]:.1f} ms |")
    print(f"| {IN_FLIGHT:,} | {loaded[0]:.1f} ms | {loaded[1]:.1f} ms |")
    print(f"ratio (loaded p50 / idle p50): {loaded[0] / idle[0]:.2f}")


main()
