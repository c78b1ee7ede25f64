#!/usr/bin/env python3
"""A onceflow push handler: checks each call's Standard Webhooks signature.
demo.greet answers 200 with a result (or a 4xx problem to refuse); demo.card
answers 202 at once and reports later through the attempt's callbacks (and
stops when a signed cancel request comes). Every
call of a job has the same Idempotency-Key (its job id): pass it on.
Run: python examples/python/handler.py  (HANDLER_SECRET, HANDLER_PORT=8090)"""
import json
import os
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

# The processor's development signing secret (public, for local use only).
SECRET = os.environ.get("HANDLER_SECRET", "whsec_EWIs7O2KYozvz1pVwbkU8vFnC4/A2OIJxkBw9KBvCV4=")
CANCELLED = set()  # jobs whose tenants cancelled them while a card was drawn


def report(links, action, body):  # a callback: heartbeat, complete or fail
    request = urllib.request.Request(links[action], json.dumps(body).encode(), method="POST", headers={
        "authorization": "Bearer " + links["token"], "content-type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def draw_card(command):  # long work, after the 202: progress, then the result
    for percent in (30, 60, 90):
        time.sleep(0.5)
        if command["job_id"] in CANCELLED:
            return  # its tenant cancelled it; our 200 to the cancel request confirmed
        report(command["callbacks"], "heartbeat", {"progress_percent": percent})
    card = {"card": f"A card for {command['payload']['name']}", "attempt": command["attempt"]}
    report(command["callbacks"], "complete", {"result": card})


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            command = Webhook(SECRET).verify(body, headers)
        except WebhookVerificationError:
            return self.answer(401, {"title": "Bad signature"})
        if headers.get("onceflow-action") == "cancel":
            CANCELLED.add(command["job_id"])
            return self.answer(200, {"stopped": True})
        if command["type"] == "demo.card":
            threading.Thread(target=draw_card, args=(command,), daemon=True).start()
            return self.answer(202, {"accepted": True})
        name = command["payload"]["name"]
        if name.lower() == "nobody":
            return self.answer(422, {"code": "unknown_name", "title": "No such person", "detail": f"{name}?"})
        self.answer(200, {"greeting": f"Hello, {name}!", "attempt": command["attempt"]})

    def answer(self, status, document):
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json" if status < 300 else "application/problem+json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("HANDLER_PORT", "8090"))), Handler)
print(json.dumps({"listening": "%s:%d" % server.server_address}), flush=True)
server.serve_forever()
