#!/usr/bin/env python3
"""A webhook receiver for onceflow's callbacks, verified with the
`standardwebhooks` library.

onceflow signs every webhook per Standard Webhooks: the headers webhook-id
(the same on every retry of one delivery, so a receiver deduplicates on it),
webhook-timestamp and webhook-signature (`v1,<base64 HMAC-SHA256 of
"id.timestamp.body">`, one per active secret during a rotation). This receiver
checks them with `standardwebhooks.Webhook.verify`, which also refuses a
timestamp more than five minutes away from now (a replay), against each of
the tenant's secrets, and answers:

- 401 when no secret verifies the request, as a real receiver must;
- the status a path asks for: POST /status/503 answers 503 (onceflow retries
  it, and its destination's circuit breaker opens), /status/410 answers 410
  (onceflow disables that endpoint for the tenant); any other path 204.

It logs one JSON line per request on standard output (`signature` is `valid`
or why not), and GET /requests returns the last MAX_KEPT of them (newest
last); GET /healthz answers 200.

    pip install -r examples/python/requirements.txt
    WEBHOOK_SECRETS='whsec_...' python examples/python/webhook_receiver.py

Environment: WEBHOOK_SECRETS, the tenant's secrets separated by spaces
(newest first, as in the notifier's `webhooks.secrets`; default: the
development secret of tenant `dev`); RECEIVER_PORT (default 9999; 0 picks a
free one); RECEIVER_HOST (default 0.0.0.0). The first line on standard output
says where it listens: {"listening": "host:port"}.

docker compose runs it as the `webhook-receiver` service.
"""

import collections
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

# The development secret of tenant `dev`, from the local stack's settings
# (public, for local use only).
DEV_SECRET = "whsec_wxHCuwgbcuDDevnXDKoQweYZMgBiVWPSZELpGPwpv8M="
# Requests kept for GET /requests; older ones are dropped (the log keeps all).
MAX_KEPT = 100
# Bodies above this are refused with 413 unread (onceflow's are a few KiB).
MAX_BODY_BYTES = 1 << 20

STATUS_PATH = re.compile(r"^/status/([1-5][0-9][0-9])/?$")


def verifiers(text):
    """One `Webhook` per space-separated `whsec_<base64>` secret."""
    secrets = text.split()
    if not secrets:
        sys.exit("webhook_receiver: WEBHOOK_SECRETS names no secret")
    for secret in secrets:
        if not secret.startswith("whsec_"):
            sys.exit(f"webhook_receiver: a secret must start with whsec_, got {secret[:10]}...")
    return [Webhook(secret) for secret in secrets]


def verdict(webhooks, body, headers):
    """`valid`, or why no secret verifies the request."""
    reason = "no secret"
    for webhook in webhooks:
        try:
            webhook.verify(body, headers, json_parse=False)
            return "valid"
        except WebhookVerificationError as error:
            reason = str(error)
        except (ValueError, UnicodeDecodeError) as error:
            # A malformed signature header or a body that is not UTF-8.
            reason = f"malformed request: {error}"
    return reason


class Receiver(BaseHTTPRequestHandler):
    webhooks = []
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
        headers = {name.lower(): value for name, value in self.headers.items()}
        signature = verdict(self.webhooks, body, headers)
        wanted = STATUS_PATH.match(self.path.split("?", 1)[0])
        status = 401 if signature != "valid" else int(wanted.group(1)) if wanted else 204

        try:
            payload = json.loads(body)
        except ValueError:
            payload = body.decode("utf-8", "replace")
        record = {
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "path": self.path,
            "webhook_id": headers.get("webhook-id", ""),
            "webhook_timestamp": headers.get("webhook-timestamp", ""),
            "traceparent": headers.get("traceparent"),
            "signature": signature,
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
    Receiver.webhooks = verifiers(os.environ.get("WEBHOOK_SECRETS", DEV_SECRET))
    host = os.environ.get("RECEIVER_HOST", "0.0.0.0")
    server = ThreadingHTTPServer((host, int(os.environ.get("RECEIVER_PORT", "9999"))), Receiver)
    # As PID 1 in its container, the process must end on SIGTERM itself.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"listening": f"{host}:{server.server_address[1]}"}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
