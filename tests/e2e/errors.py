"""Every refusal with its exact status, type and code: auth, malformed
bodies, wrong types, invalid UTF-8, unknown fields and models, limits on n
and context, huge bodies, unsupported parameters, use-case policy (with
auto-suspension), suspension, revocation and rate limits."""

import time

import httpx
import openai

from common import BASE, admin_headers, client, create_key, expect_error, model_id, ok, post

key = create_key(scopes=["completions"])
secret = key["secret"]
model = model_id(client(secret))
C = "/v1/completions"

expect_error(post(C, None, {"model": model, "prompt": "x"}), 401, "invalid_request_error", "invalid_api_key")
expect_error(post(C, "sk-nope-000000000000", {"model": model, "prompt": "x"}), 401, "invalid_request_error",
             "invalid_api_key")
try:
    client("sk-nope-000000000000").completions.create(model=model, prompt="x")
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.code == "invalid_api_key"
ok("401 invalid_api_key")

expect_error(post(C, secret, content=b'{"model": "m", "prompt": '), 400, "invalid_request_error", None, None)
expect_error(post(C, secret, content=b'{"model": "m", "prompt": "\xff\xfe"}'), 400, "invalid_request_error", None,
             None)
expect_error(post(C, secret, content=b"[1, 2]"), 400, "invalid_request_error", None)
ok("400 malformed JSON and invalid UTF-8")

expect_error(post(C, secret, {"model": model, "prompt": "x", "max_tokens": "ten"}), 400, "invalid_request_error",
             None, "max_tokens")
expect_error(post(C, secret, {"model": model, "prompt": "x", "temperature": [1]}), 400, "invalid_request_error",
             None, "temperature")
expect_error(post(C, secret, {"model": model, "prompt": "x", "frobnicate": 1}), 400, "invalid_request_error", None,
             "frobnicate")
expect_error(post("/v1/chat/completions", secret, {"model": model, "messages": [{"role": "user", "content": 5}]}),
             400, "invalid_request_error", None, "messages[0].content")
expect_error(post("/v1/chat/completions", secret, {"model": model, "messages": []}), 400, "invalid_request_error",
             None, "messages")
expect_error(post("/v1/chat/completions", secret, {"model": model, "messages": [{"role": "wizard", "content": "x"}]}),
             400, "invalid_request_error", None, "messages[0].role")
ok("400 wrong types, unknown fields, bad messages")

expect_error(post(C, secret, {"model": model, "prompt": "x", "suffix": "y"}), 400, "invalid_request_error",
             "unsupported_parameter", "suffix")
expect_error(post("/v1/chat/completions", secret,
                  {"model": model, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
             400, "invalid_request_error", "unsupported_parameter", "tools")
ok("400 unsupported parameters are named, not ignored")

expect_error(post(C, secret, {"model": "gpt-9", "prompt": "x"}), 404, "invalid_request_error", "model_not_found",
             "model")
try:
    client(secret).completions.create(model="gpt-9", prompt="x")
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.code == "model_not_found"
ok("404 model_not_found")

expect_error(post(C, secret, {"model": model, "prompt": "x", "n": 1000}), 400, "invalid_request_error", None, "n")
expect_error(post(C, secret, {"model": model, "prompt": "x", "logprobs": 9}), 400, "invalid_request_error", None,
             "logprobs")
expect_error(post(C, secret, {"model": model, "prompt": "x", "temperature": 5}), 400, "invalid_request_error",
             None, "temperature")
expect_error(post(C, secret, {"model": model, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400,
             "invalid_request_error", None, "stop")
context = client(secret).models.retrieve(model).model_extra["context_length"]
expect_error(post(C, secret, {"model": model, "prompt": [1] * (context + 1), "max_tokens": 1}), 400,
             "invalid_request_error", None, "prompt")
expect_error(post(C, secret, {"model": model, "prompt": "hello", "max_tokens": context}), 400,
             "invalid_request_error", None, "max_tokens")
ok("400 n, logprobs, temperature, stop, context length")

huge = b'{"model": "m", "prompt": "' + b"a" * (5 << 20) + b'"}'
expect_error(post(C, secret, content=huge), 413, "invalid_request_error", "request_too_large")
ok("413 body too large")

expect_error(httpx.get(f"{BASE}/v1/nothing-here", headers=admin_headers()), 404, "invalid_request_error",
             "not_found")
ok("404 unknown route")

# Use-case policy: a summarization-only key, and high-stakes domains.
summ = create_key(scopes=["completions"], use_cases=["summarization"])["secret"]
r = post(C, summ, {"model": model, "prompt": "Summarize this article in one sentence: The council met on Monday.",
                   "max_tokens": 2})
assert r.status_code == 200, r.text
e = expect_error(post(C, summ, {"model": model, "prompt": "Write a short story about a dragon.", "max_tokens": 2}),
                 403, "permission_error", "use_case_not_allowed")
assert "generation" in e["message"], e
e = expect_error(post(C, secret, {"model": model, "max_tokens": 2,
                                  "prompt": "Should we approve this loan? Decide the applicant's credit eligibility."}),
                 403, "permission_error", "use_case_not_allowed")
assert "credit" in e["message"], e
try:
    client(summ).completions.create(model=model, prompt="Write a poem about the ocean.", max_tokens=2)
    raise AssertionError("expected PermissionDeniedError")
except openai.PermissionDeniedError as e:
    assert e.code == "use_case_not_allowed"
approved = create_key(scopes=["completions"], approved_domains=["credit_eligibility"])["secret"]
r = post(C, approved, {"model": model, "max_tokens": 2,
                       "prompt": "Should we approve this loan? Decide the applicant's credit eligibility."})
assert r.status_code == 200, r.text
ok("403 use-case policy and approved domains")

# Suspension, reinstatement, revocation.
victim = create_key(scopes=["completions"])
r = httpx.post(f"{BASE}/admin/keys/{victim['id']}/suspend", json={"reason": "abuse report"}, headers=admin_headers())
assert r.status_code == 200 and r.json()["status"] == "suspended", r.text
time.sleep(0.6)
e = expect_error(post(C, victim["secret"], {"model": model, "prompt": "hi", "max_tokens": 1}), 403,
                 "permission_error", "key_suspended")
assert "abuse report" in e["message"]
r = httpx.post(f"{BASE}/admin/keys/{victim['id']}/reinstate", headers=admin_headers())
assert r.status_code == 200 and r.json()["status"] == "active", r.text
time.sleep(0.6)
assert post(C, victim["secret"], {"model": model, "prompt": "hi", "max_tokens": 1}).status_code == 200
r = httpx.delete(f"{BASE}/admin/keys/{victim['id']}", headers=admin_headers())
assert r.status_code == 200 and r.json()["deleted"] is True, r.text
time.sleep(0.6)
expect_error(post(C, victim["secret"], {"model": model, "prompt": "hi", "max_tokens": 1}), 401,
             "invalid_request_error", "invalid_api_key")
# A revoked key's status is final: changing it conflicts with its state.
expect_error(httpx.post(f"{BASE}/admin/keys/{victim['id']}/reinstate", headers=admin_headers()), 409,
             "invalid_request_error", "key_revoked")
expect_error(httpx.post(f"{BASE}/admin/keys/key_missing/suspend", headers=admin_headers()), 404,
             "invalid_request_error", "not_found")
ok("suspend, reinstate, revoke")

# Scopes: a completions key cannot use admin routes.
expect_error(httpx.get(f"{BASE}/admin/keys", headers={"Authorization": f"Bearer {secret}"}), 403,
             "permission_error", "insufficient_scope")
listed = httpx.get(f"{BASE}/admin/keys", headers=admin_headers()).json()["data"]
assert all("secret" not in k for k in listed) and any(k["id"] == key["id"] for k in listed)
ok("admin scope; list never shows secrets")

# Rate limits: 2 requests per minute.
limited = create_key(scopes=["completions"], limits={"requests_per_minute": 2, "tokens_per_minute": 0,
                                                     "max_concurrent": 0})["secret"]
for _ in range(2):
    assert post(C, limited, {"model": model, "prompt": "hi", "max_tokens": 1}).status_code == 200
r = post(C, limited, {"model": model, "prompt": "hi", "max_tokens": 1})
expect_error(r, 429, "requests", "rate_limit_exceeded")
assert int(r.headers["retry-after"]) >= 1, r.headers
assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "0"
try:
    client(limited).completions.create(model=model, prompt="hi", max_tokens=1)
    raise AssertionError("expected RateLimitError")
except openai.RateLimitError as e:
    assert e.code == "rate_limit_exceeded"
ok("429 rate_limit_exceeded with Retry-After and x-ratelimit headers")

tokens = create_key(scopes=["completions"], limits={"requests_per_minute": 0, "tokens_per_minute": 50,
                                                    "max_concurrent": 0})["secret"]
expect_error(post(C, tokens, {"model": model, "prompt": "hi", "max_tokens": 100}), 429, "requests",
             "rate_limit_exceeded")
ok("429 when one request exceeds the tokens per minute")
print("all passed")
