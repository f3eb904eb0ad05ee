"""The loop, end to end: consented playground prompts and demonstrations go
in through the gateway; the trainer ingests them, snapshots, fine-tunes (SFT),
publishes and announces a checkpoint; the gateway verifies and promotes it,
and completions then name it in system_fingerprint."""

import time

import httpx

from common import BASE, accept_consent, admin_headers, client, create_key, model_id, ok, playground, post

users = [create_key(user=f"loop-user-{i}", scopes=["playground", "completions"])["secret"] for i in range(12)]
model = model_id(client(users[0]))
initial = httpx.get(f"{BASE}/admin/checkpoints", headers=admin_headers()).json()["serving"]
for i, secret in enumerate(users):
    accept_consent(secret)
    p = playground(secret, model, f"Question {i}: what colour is the sky?", k=2)
    assert p["logged"], p
    res = post("/v1/feedback", secret, {"type": "demonstration", "prompt_id": p["prompt_id"], "response": "Blue."})
    assert res.status_code == 201, res.text
ok("12 consented prompts with demonstrations submitted")

deadline = time.monotonic() + 300
while True:
    status = httpx.get(f"{BASE}/admin/checkpoints", headers=admin_headers()).json()
    if status["serving"] != initial:
        break
    failed = [row for row in status["data"] if row["role"] == "failed"]
    assert not failed, failed
    assert time.monotonic() < deadline, f"no refresh was promoted within 300 s: {status}"
    time.sleep(0.5)
serving = status["serving"]
row = next(r for r in status["data"] if r["id"] == serving)
assert serving.startswith("sft-") and row["stage"] == "sft" and row["parent"].startswith("base:"), row
assert row["metrics"]["train_examples"] >= 4 and row["snapshots"], row
ok(f"SFT refresh {serving} trained on {row['metrics']['train_examples']} demonstrations and promoted")

r = client(users[0]).completions.create(model=model, prompt="Hello", max_tokens=4)
assert r.system_fingerprint == serving, r.system_fingerprint
ok("completions now come from the refreshed checkpoint")

res = httpx.post(f"{BASE}/admin/checkpoints/rollback", headers=admin_headers())
assert res.status_code == 200 and res.json()["serving"] == initial, res.text
assert client(users[0]).completions.create(model=model, prompt="Hello", max_tokens=2).system_fingerprint == initial
ok("rolled back to the start-up model")
print("all passed")
