// A onceflow pull worker for `demo.report`, with Node's built-in fetch and no
// SDK: it long-polls the processor for tasks, builds each report page by
// page, heartbeats its progress (which extends its lease and becomes a
// `job.processing` event), and completes the job. A worker that dies loses
// its task when the lease ends; the task is handed out again with the same
// idempotency key, so pass that key on to whatever you call.
//
// Run: npm ci && npm run build && npm start
// Environment: ONCEFLOW_PROCESSOR_URL (http://127.0.0.1:8081),
// ONCEFLOW_WORKER_KEY (dev-worker-key), PAGE_MS (time per page, 500).

const processor = process.env.ONCEFLOW_PROCESSOR_URL ?? "http://127.0.0.1:8081";
const workerKey = process.env.ONCEFLOW_WORKER_KEY ?? "dev-worker-key";
const pageMs = Number(process.env.PAGE_MS ?? "500");

interface Links { token: string; heartbeat: string; complete: string; fail: string; release: string }
interface Task {
  job_id: string;
  type: string;
  payload: { report_id: string; pages?: number };
  attempt: number;
  idempotency_key: string;
  lease_expires_at: string;
  callbacks: Links;
}

const log = (event: string, fields: object = {}) => console.log(JSON.stringify({ event, ...fields }));
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function post(url: string, token: string, body: object): Promise<{ status: number; json: any }> {
  const response = await fetch(url, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: response.status, json: await response.json().catch(() => null) };
}

let stopping = false;
let current: Task | undefined;
// On SIGTERM the task in hand goes back at once (no attempt spent).
process.on("SIGTERM", async () => {
  stopping = true;
  if (current) await post(current.callbacks.release, current.callbacks.token, {});
  process.exit(0);
});

async function build(task: Task): Promise<void> {
  const { callbacks: links, payload } = task;
  const pages = payload.pages ?? 5;
  for (let page = 1; page <= pages; page++) {
    await sleep(pageMs); // the real work, e.g. rendering with task.idempotency_key
    const beat = await post(links.heartbeat, links.token, { progress_percent: Math.floor((page * 100) / pages), details: { page } });
    if (beat.status === 409) return log("given_up", { job_id: task.job_id, outcome: beat.json?.outcome });
    if (beat.json?.cancel_requested) {
      // Its tenant cancelled it: stop, and confirm (the job ends `cancelled`).
      await post(links.fail, links.token, { code: "cancelled", message: `stopped at page ${page}` });
      return log("cancelled", { job_id: task.job_id, page });
    }
  }
  const result = { report_id: payload.report_id, pages, attempt: task.attempt };
  const done = await post(links.complete, links.token, { result });
  log("completed", { job_id: task.job_id, status: done.status, attempt: task.attempt });
}

log("polling", { processor });
while (!stopping) {
  let polled;
  try {
    polled = await post(`${processor}/v1/workers/poll`, workerKey, { types: ["demo.report"], wait_ms: 30000 });
  } catch (error) {
    log("processor_unreachable", { error: String(error) });
    await sleep(1000);
    continue;
  }
  if (polled.status !== 200) {
    log("poll_refused", { status: polled.status, problem: polled.json });
    await sleep(1000);
    continue;
  }
  for (const task of polled.json.tasks as Task[]) {
    current = task;
    log("started", { job_id: task.job_id, attempt: task.attempt });
    try {
      await build(task);
    } catch (error) {
      await post(task.callbacks.fail, task.callbacks.token, { code: "worker_error", message: String(error), retryable: true });
    }
    current = undefined;
  }
}
