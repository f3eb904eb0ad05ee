"""Phase 'down' runs while Redis is stopped: completions still work for a
key seen before (cached) and for the bootstrap admin key, local rate limits
still hold, and /readyz and /metrics report the degradation. Phase 'up' runs
after Redis is back."""

import os
import time

import httpx

from common import BASE, admin_headers, create_key, expect_error, ok, post

state_file = os.environ["INSTRUCTD_STATE_FILE"]
phase = os.environ["PHASE"]

if phase == "before":
    key = create_key(limits={"requests_per_minute": 3, "tokens_per_minute": 0, "max_concurrent": 0})
    model = httpx.get(f"{BASE}/v1/models", headers=admin_headers()).json()["data"][0]["id"]
    assert post("/v1/completions", key["secret"], {"model": model, "prompt": "hi", "max_tokens": 1}).status_code == 200
    with open(state_file, "w") as f:
        f.write(f"{key['secret']}\n{model}\n")
    ok("before the outage")
elif phase == "down":
    secret, model = open(state_file).read().split()
    ready = httpx.get(f"{BASE}/readyz").json()
    assert ready["status"] == "degraded" and ready["redis"]["reachable"] is False, ready
    assert ready["rate_limits"] == "local_only", ready
    metrics = httpx.get(f"{BASE}/metrics").text
    assert "instructd_redis_reachable 0" in metrics, metrics
    r = post("/v1/completions", ADMIN := os.environ["INSTRUCTD_ADMIN_KEY"], {"model": model, "prompt": "hi",
                                                                            "max_tokens": 2})
    assert r.status_code == 200, r.text
    # The local limiter alone: 3 per minute for this key on this replica.
    statuses = [post("/v1/completions", secret, {"model": model, "prompt": "hi", "max_tokens": 1}).status_code
                for _ in range(4)]
    assert 200 in statuses and statuses[-1] == 429, statuses
    expect_error(post("/v1/completions", "sk-never-seen-0000000000", {"model": model, "prompt": "hi"}), 503,
                 "server_error", "service_unavailable")
    ok("serving through a Redis outage with local limits")
elif phase == "up":
    deadline = time.monotonic() + 10
    while httpx.get(f"{BASE}/readyz").json()["status"] != "ready":
        assert time.monotonic() < deadline, "readyz did not recover"
        time.sleep(0.2)
    ok("ready again once Redis is back")
print("all passed")
