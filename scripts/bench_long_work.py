#!/usr/bin/env python3
"""Long work's figures, measured from outside on the running local stack
(scripts/stack.sh up) with the development API key and worker key:

- dispatch: the latency from a command's 202 to its task in a waiting
  worker's poll, PROBES commands one at a time, first with nothing in
  flight, then with IN_FLIGHT tasks of the same type leased and held
  (bench.hold's lease is 30 minutes), then again once they all ended (what
  the load left behind, apart from what is in flight);
- a dead worker: tasks of demo.report (lease 10 s) taken and never
  heartbeated; how long after each lease's end the task is handed out again;
- cancellation: a queued job's cancel once the processor holds it (the
  request's round trip, which ends it), and a running one's: from the
  cancel's answer to a waiting poll that says `cancelled`.

Run: python3 scripts/bench_long_work.py [IN_FLIGHT=10000] [PROBES=200]
(the standard library only).
"""
import concurrent.futures
import datetime
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


def cancel(job_id):
    started = time.perf_counter()
    status, body = post(f"{INGEST}/v1/jobs/{job_id}/cancel", {}, API_KEY)
    return status, body, (time.perf_counter() - started) * 1000


def recorded(job_id):
    """Wait until the processor holds the job (it says what the job waits for)."""
    request = urllib.request.Request(f"{INGEST}/v1/jobs/{job_id}", headers={"authorization": f"Bearer {API_KEY}"})
    while True:
        with urllib.request.urlopen(request, timeout=10) as response:
            if json.load(response).get("waiting_for"):
                return
        time.sleep(0.01)


def submit_job(command_type, payload, key):
    status, body = post(f"{INGEST}/v1/commands", {"type": command_type, "payload": payload}, API_KEY,
                        {"idempotency-key": f"{RUN}-{key}"})
    assert status == 202, (status, body)
    return body["job_id"]


def poll_types(types, max_tasks, wait_ms):
    status, body = post(f"{PROCESSOR}/v1/workers/poll", {"types": types, "max_tasks": max_tasks, "wait_ms": wait_ms},
                        WORKER_KEY)
    assert status == 200, (status, body)
    return body


def dead_worker(count=5):
    """ms from each lease's end to the task handed out again."""
    for n in range(count):
        submit_job("demo.report", {"report_id": f"{RUN}-dead-{n}", "pages": 1}, f"dead-{n}")
    taken = []
    while len(taken) < count:
        taken.extend(poll_types(["demo.report"], count, 10_000)["tasks"])
    ends = {t["job_id"]: datetime.datetime.fromisoformat(t["lease_expires_at"].replace("Z", "+00:00")) for t in taken}
    delays = []
    while len(delays) < count:
        for task in poll_types(["demo.report"], count, 30_000)["tasks"]:
            now = datetime.datetime.now(datetime.timezone.utc)
            delays.append((now - ends[task["job_id"]]).total_seconds() * 1000)
            complete(task)
    return delays


def cancellations(count=20):
    """ms of a queued job's cancel; ms from a running one's cancel to a waiting poll's word."""
    queued, told = [], []
    for n in range(count):
        job_id = submit_job("bench.hold", {"key": f"cancel-q-{n}"}, f"cancel-q-{n}")
        recorded(job_id)
        status = cancel(job_id)
        assert status[0] == 200, status
        queued.append(status[2])
    for n in range(count):
        submit(f"cancel-r-{n}")
        task = poll(1, 10_000)[0]
        with concurrent.futures.ThreadPoolExecutor(1) as waiting:
            heard = waiting.submit(poll_types, ["bench.hold"], 1, 10_000)
            time.sleep(0.05)
            status, body, _ = cancel(task["job_id"])
            answered = time.perf_counter()
            assert status == 202, (status, body)
            assert task["job_id"] in heard.result()["cancelled"]
            told.append((time.perf_counter() - answered) * 1000)
        post(task["callbacks"]["fail"], {"code": "cancelled"}, task["callbacks"]["token"])
    return queued, told


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
    # The same with those 10,000 ended: what the load left behind (dead rows,
    # grown topics) apart from what is in flight.
    after = probe("after")
    dead = dead_worker()
    queued, told = cancellations()
    print(f"| executions in flight | 202 -> task p50 | p99 |\n|---|---|---|")
    print(f"| 0 | {idle[0]:.1f} ms | {idle[1]:.1f} ms |")
    print(f"| {IN_FLIGHT:,} | {loaded[0]:.1f} ms | {loaded[1]:.1f} ms |")
    print(f"| 0 again, those {IN_FLIGHT:,} ended | {after[0]:.1f} ms | {after[1]:.1f} ms |")
    print(f"ratio (loaded p50 / idle p50): {loaded[0] / idle[0]:.2f}; "
          f"(loaded p50 / the p50 after they ended): {loaded[0] / after[0]:.2f}")
    print(f"dead worker's task handed out again after its lease ended: max {max(dead):.0f} ms, "
          f"median {statistics.median(dead):.0f} ms ({len(dead)} tasks)")
    print(f"queued job cancelled (request round trip): median {statistics.median(queued):.1f} ms, "
          f"max {max(queued):.1f} ms; running job's worker told (waiting poll): median "
          f"{statistics.median(told):.1f} ms, max {max(told):.1f} ms ({len(told)} each)")


main()
