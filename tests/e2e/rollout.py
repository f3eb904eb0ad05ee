"""Checkpoint rollout under load: while clients send completions, ten
checkpoints are announced, verified, (one canaried) and promoted, a corrupt
one is refused, and a rollback restores the previous one. No request fails,
and every response names the checkpoint that produced it (same checkpoint,
same greedy text)."""

import os
import threading
import time
from collections import defaultdict

import httpx

from common import BASE, admin_headers, create_key, ok, post, redis_client

r = redis_client()
secret = create_key(limits={"requests_per_minute": 0, "tokens_per_minute": 0, "max_concurrent": 0})["secret"]
model = httpx.get(f"{BASE}/v1/models", headers=admin_headers()).json()["data"][0]["id"]
initial = httpx.get(f"{BASE}/admin/checkpoints", headers=admin_headers()).json()["serving"]

results = []
stop = threading.Event()


def client():
    with httpx.Client(timeout=60) as h:
        while not stop.is_set():
            res = h.post(f"{BASE}/v1/completions", headers={"Authorization": f"Bearer {secret}"},
                         json={"model": model, "prompt": "Hello there", "max_tokens": 6, "temperature": 0})
            body = res.json()
            results.append((res.status_code, body.get("system_fingerprint"), body.get("choices", [{}])[0].get("text")))


def status():
    return httpx.get(f"{BASE}/admin/checkpoints", headers=admin_headers()).json()


def wait_for(ckpt, role):
    deadline = time.monotonic() + 60
    while True:
        rows = {row["id"]: row for row in status()["data"]}
        if ckpt in rows and rows[ckpt]["role"] == role:
            return rows[ckpt]
        assert time.monotonic() < deadline, f"{ckpt} never became {role}: {rows.get(ckpt)}"
        time.sleep(0.05)


threads = [threading.Thread(target=client) for _ in range(6)]
for t in threads:
    t.start()
time.sleep(0.5)
ids = [f"ckpt-{i}" for i in range(1, 11)]
for i, ckpt in enumerate(ids):
    r.xadd("instructd:checkpoints", {"kind": "checkpoint", "id": ckpt})
    wait_for(ckpt, "ready")
    if i == 0:
        res = httpx.post(f"{BASE}/admin/checkpoints/{ckpt}/canary", json={"percent": 50}, headers=admin_headers())
        assert res.status_code == 200 and res.json()["canary"] == {"id": ckpt, "percent": 50}, res.text
        time.sleep(0.5)
    res = httpx.post(f"{BASE}/admin/checkpoints/{ckpt}/promote", headers=admin_headers())
    assert res.status_code == 200 and res.json()["serving"] == ckpt, res.text
    time.sleep(0.3)
ok("ten checkpoints promoted under load (the first after a 50% canary)")

r.xadd("instructd:checkpoints", {"kind": "checkpoint", "id": "ckpt-corrupt"})
bad = wait_for("ckpt-corrupt", "failed")
assert "checksum" in bad["failure"], bad
assert status()["serving"] == "ckpt-10"
res = httpx.post(f"{BASE}/admin/checkpoints/ckpt-corrupt/promote", headers=admin_headers())
assert res.status_code == 409, res.text
ok("a corrupt checkpoint is refused and the serving one stays")

res = httpx.post(f"{BASE}/admin/checkpoints/rollback", headers=admin_headers())
assert res.status_code == 200 and res.json()["serving"] == "ckpt-9" and res.json()["restored"] == "ckpt-9", res.text
time.sleep(0.5)
stop.set()
for t in threads:
    t.join()

failed = [x for x in results if x[0] != 200]
assert not failed, failed[:5]
texts = defaultdict(set)
for _, fingerprint, text in results:
    texts[fingerprint].add(text)
assert set(texts) <= {initial, *ids}, set(texts)
assert all(len(t) == 1 for t in texts.values()), {k: v for k, v in texts.items() if len(v) > 1}
assert len(texts) >= 5, f"responses came from only {sorted(texts)}"
assert results[-1][1] == "ckpt-9"
lineage = {row["id"]: row for row in status()["data"]}
assert lineage["ckpt-10"]["parent"] == "ckpt-9" and lineage["ckpt-10"]["stage"] == "sft"
ok(f"{len(results)} requests, none failed; {len(texts)} checkpoints answered, each with its own text")
print("all passed")
