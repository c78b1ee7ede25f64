#!/usr/bin/env python3
"""A webhook receiver to try onceflow's callbacks against (docker compose).

It verifies each delivery's Standard Webhooks signature (webhook-id,
webhook-timestamp, webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">) with the secrets in WEBHOOK_SECRETS, logs one JSON
line per request to stdout, and answers:

- 401 when the signature is missing or wrong, or the timestamp is more than
  RECEIVER_TOLERANCE_SECS away from now (a replay), as a real receiver must;
- the status a path asks for: POST /status/503 answers 503 (the notifier
  retries it and its destination's breaker opens), /status/410 answers 410
  (the endpoint is disabled); any other path answers 204.

GET /requests returns the last MAX_KEPT requests as JSON (newest last);
GET /healthz answers 200. Standard library only, so the stock python image
runs it as is.
"""

import base64
import collections
import hashlib
import hmac
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The development secret of tenant `dev`, from the notifier's defaults (public,
# for local use only).
DEV_SECRET = "whsec_wxHCuwgbcuDDevnXDKoQweYZMgBiVWPSZELpGPwpv8M="
# Requests kept for GET /requests; older ones are dropped (the log keeps all).
MAX_KEPT = 100
# Bodies above this are refused with 413 unread (onceflow's are a few KiB).
MAX_BODY_BYTES = 1 << 20

STATUS_PATH = re.compile(r"^/status/([1-5][0-9][0-9])/?$")


def parse_secrets(text):
    """The HMAC keys of space-separated `whsec_<base64>` secrets."""
    keys = []
    for secret in text.split():
        if not secret.startswith("whsec_"):
            sys.exit(f"receiver: a secret must start with whsec_, got {secret[:10]}...")
        keys.append(base64.b64decode(secret[len("whsec_"):], validate=True))
    if not keys:
        sys.exit("receiver: WEBHOOK_SECRETS names no secret")
    return keys


def signature_valid(keys, msg_id, timestamp, body, header):
    """Whether one `v1,` signature of `header` verifies with one of `keys`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = [base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()) for key in keys]
    offered = [part[3:].encode() for part in header.split(" ") if part.startswith("v1,")]
    return any(hmac.compare_digest(e, o) for e in expected for o in offered)


class Receiver(BaseHTTPRequestHandler):
    keys = []
    tolerance_secs = 300
    kept = collections.deque(maxlen=MAX_KEPT)
    kept_lock = threading.Lock()

    def do_GET(self):
        if self.path == "/healthz":
            self.answer(200, b"ok\n", "text/plain")
        elif self.path == "/requests":
            with self.kept_lock:
                kept = list(self.kept)
            self.answer(200, json.dumps(kept, indent=2).encode() + b"\n", "application/json")
        else:
            self.answer(404, b"POST webhooks here; GET /requests lists the last ones\n", "text/plain")

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self.answer(413, b"body too large or without a length\n", "text/plain")
            return
        body = self.rfile.read(length)
        msg_id = self.headers.get("webhook-id", "")
        timestamp = self.headers.get("webhook-timestamp", "")
        header = self.headers.get("webhook-signature", "")

        if not (msg_id and timestamp and header):
            verdict = "missing"
        elif not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.tolerance_secs:
            verdict = "stale_timestamp"
        elif not signature_valid(self.keys, msg_id, timestamp, body, header):
            verdict = "invalid"
        else:
            verdict = "valid"
        wanted = STATUS_PATH.match(self.path.split("?", 1)[0])
        status = 401 if verdict != "valid" else int(wanted.group(1)) if wanted else 204

        try:
            payload = json.loads(body)
        except ValueError:
            payload = body.decode("utf-8", "replace")
        record = {
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "path": self.path,
            "webhook_id": msg_id,
            "webhook_timestamp": timestamp,
            "traceparent": self.headers.get("traceparent"),
            "signature": verdict,
            "answer": status,
            "body": payload,
        }
        with self.kept_lock:
            self.kept.append(record)
        print(json.dumps(record), flush=True)
        self.answer(status, b"", None)

    def answer(self, status, body, content_type):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format, *args):
        # One JSON line per webhook is the log; no access-log lines beside it.
        pass


def main():
    Receiver.keys = parse_secrets(os.environ.get("WEBHOOK_SECRETS", DEV_SECRET))
    Receiver.tolerance_secs = int(os.environ.get("RECEIVER_TOLERANCE_SECS", "300"))
    port = int(os.environ.get("RECEIVER_PORT", "9999"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Receiver)
    # As PID 1 in its container, the process must end on SIGTERM itself.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"receiver: listening on 0.0.0.0:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
