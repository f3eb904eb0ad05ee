"""Two gateways sharing one Redis: together they admit no more than a key's
limit, and a suspension made on one is refused by the other within a second."""

import os
import time

import httpx

from common import admin_headers, create_key, expect_error, ok, post

A = os.environ["INSTRUCTD_URL"]
B = os.environ["INSTRUCTD_URL_B"]
model = httpx.get(f"{A}/v1/models", headers=admin_headers()).json()["data"][0]["id"]

key = create_key(base=A, limits={"requests_per_minute": 10, "tokens_per_minute": 0, "max_concurrent": 0})
statuses = []
for i in range(24):
    base = A if i % 2 == 0 else B
    statuses.append(post("/v1/completions", key["secret"], {"model": model, "prompt": "hi", "max_tokens": 1},
                         base=base).status_code)
assert statuses.count(200) == 10 and statuses.count(429) == 14, statuses
ok("two replicas together admit exactly the key's limit")

prompt_tokens = post("/v1/completions", os.environ["INSTRUCTD_ADMIN_KEY"],
                     {"model": model, "prompt": "hi", "max_tokens": 1}).json()["usage"]["prompt_tokens"]
charge = prompt_tokens + 9
tokens = create_key(base=B, limits={"requests_per_minute": 0, "tokens_per_minute": 40, "max_concurrent": 0})
admitted = 0
for i in range(8):
    r = post("/v1/completions", tokens["secret"], {"model": model, "prompt": "hi", "max_tokens": 9},
             base=A if i % 2 else B)
    admitted += r.status_code == 200
# Each request is charged prompt + 9 up front and refunded what it did not use,
# so at least 40 // charge get through, and the two replicas together not all 8.
assert 40 // charge <= admitted < 8, (admitted, charge)
ok("tokens per minute shared across replicas")

victim = create_key(base=A)
assert post("/v1/completions", victim["secret"], {"model": model, "prompt": "hi", "max_tokens": 1},
            base=B).status_code == 200
r = httpx.post(f"{A}/admin/keys/{victim['id']}/suspend", headers=admin_headers())
assert r.status_code == 200, r.text
suspended_at = time.monotonic()
while True:
    r = post("/v1/completions", victim["secret"], {"model": model, "prompt": "hi", "max_tokens": 1}, base=B)
    if r.status_code == 403:
        break
    assert time.monotonic() - suspended_at < 1.0, "replica B still admits the suspended key after 1 s"
    time.sleep(0.05)
expect_error(r, 403, "permission_error", "key_suspended")
print(f"replica B refused the key {time.monotonic() - suspended_at:.2f} s after the suspension")
ok("suspension reaches every replica within a second")
print("all passed")
