"""Repeated policy refusals auto-suspend a key (the gateway runs with
max_refusals = 3), the refusals are in the audit stream, and the admin API
shows the suspension."""

import httpx

from common import BASE, admin_headers, client, create_key, expect_error, model_id, ok, post

key = create_key(scopes=["completions"], use_cases=["summarization"])
model = model_id(client(key["secret"]))
for _ in range(3):
    expect_error(post("/v1/completions", key["secret"], {"model": model, "prompt": "Write a poem about rain.",
                                                         "max_tokens": 1}), 403, "permission_error",
                 "use_case_not_allowed")
listed = {k["id"]: k for k in httpx.get(f"{BASE}/admin/keys", headers=admin_headers()).json()["data"]}
assert listed[key["id"]]["status"] == "suspended", listed[key["id"]]
assert "automatically suspended" in listed[key["id"]]["status_reason"]
import time
time.sleep(0.6)
expect_error(post("/v1/completions", key["secret"], {"model": model, "prompt": "Summarize: the cat sat.",
                                                     "max_tokens": 1}), 403, "permission_error", "key_suspended")
ok("auto-suspension after repeated refusals")
print("all passed")
