"""schemathesis hooks for scripts/check-openapi.sh.

The idempotency contract says a key names one intended command: the same key
with another body is answered 422, and the same key with the same body is a
replay answered before any validation (by design: a retry is never judged
again). schemathesis draws keys from the header's pattern and reuses them
across cases; a real client never does. So before every call, in every phase,
a valid key is replaced by a fresh UUID and each request is a first request.
Invalid keys (the negative cases that check the 400) are sent as generated.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"^[!-~]{1,255}$")


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers
    if headers is None:
        return
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and VALID_KEY.match(key):
        headers["Idempotency-Key"] = str(uuid.uuid4())
