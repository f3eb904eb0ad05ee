"""Fair sharing of the engine between keys (organisations), on a fixed flood.

A flooder key queues FLOODS requests of 32 prompts with n = 4 (a fixed
amount of work); once the engine's queue holds all of it (read from
/metrics), a victim key of another organisation sends a 1-token completion.
The engine runs one request at a time (the test sets `max_running`), so the
flood stays queued. The assertions are on order, not on time, and read from
the server's side: with fair sharing the victim's answer comes back before
any flood request has finished, and while at least 90% of the flood that was
queued before it is still queued; first come, first served it would come
back after all of it. Also checks the weight field of the admin key API and
the 429 `engine_queue_share_exceeded` error.
"""

import re
import threading
import time

import httpx

from common import BASE, admin_headers, create_key, expect_error, post

FLOODS = 4
PROMPTS = 32
N = 4
# Long enough that the tiny model's flood is still queued when the victim comes.
MAX_TOKENS = 200


def queue_depth():
    text = httpx.get(f"{BASE}/metrics", timeout=30).text
    match = re.search(r"^instructd_engine_queue_depth (\S+)$", text, re.M)
    assert match, "no instructd_engine_queue_depth in /metrics"
    return int(float(match.group(1)))


def main():
    limits = {"requests_per_minute": 600, "tokens_per_minute": 0, "max_concurrent": 16}
    flooder = create_key(user="flooder", weight=1, limits=limits)["secret"]
    victim_key = create_key(user="victim")
    victim = victim_key["secret"]
    assert victim_key["weight"] == 1, victim_key
    model = httpx.get(f"{BASE}/v1/models", headers={"Authorization": f"Bearer {victim}"}).json()["data"][0]["id"]

    body = {
        "model": model,
        "prompt": [f"flood prompt {i}" for i in range(PROMPTS)],
        "n": N,
        "max_tokens": MAX_TOKENS,
        "temperature": 1.0,
        "seed": 3,
    }
    lock = threading.Lock()
    floods_done = []

    def flood():
        r = post("/v1/completions", flooder, body)
        assert r.status_code == 200, (r.status_code, r.text)
        with lock:
            floods_done.append(len(r.json()["choices"]))

    threads = [threading.Thread(target=flood) for _ in range(FLOODS)]
    for t in threads:
        t.start()
    # Wait (a state, not a duration) until the flood is queued: every prompt
    # of every request but the few the engine ran while the rest arrived.
    queued = 0
    for _ in range(2000):
        queued = queue_depth()
        if queued >= FLOODS * PROMPTS - 8:
            break
        time.sleep(0.005)
    assert queued >= FLOODS * PROMPTS - 8, f"the flood never filled the queue ({queued})"

    r = post("/v1/completions", victim, {"model": model, "prompt": "Say hi", "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, (r.status_code, r.text)
    with lock:
        finished_floods = len(floods_done)
    still_queued = queue_depth()
    print(f"victim sent with {queued} flood requests queued; answered with {still_queued} still queued")
    assert finished_floods == 0, f"{finished_floods} flood requests finished before the victim's"
    assert still_queued >= 0.9 * queued, (
        f"the victim's answer came after {queued - still_queued} of the {queued} flood requests queued before it"
    )
    for t in threads:
        t.join()
    assert floods_done == [PROMPTS * N] * FLOODS, floods_done

    # The weight is the key's, settable by an administrator.
    r = httpx.post(f"{BASE}/admin/keys/{victim_key['id']}/weight", json={"weight": 3}, headers=admin_headers())
    assert r.status_code == 200 and r.json()["weight"] == 3, r.text
    r = httpx.post(f"{BASE}/admin/keys/{victim_key['id']}/weight", json={"weight": 0}, headers=admin_headers())
    expect_error(r, 400, "invalid_request_error", None, param="weight")

    # A key past its organisation's share of the queue (the test's gateway:
    # 512 samples, 4 of these requests) is refused with a 429, whole.
    big = dict(body, max_tokens=16)
    results = []

    def send():
        results.append(post("/v1/completions", flooder, big))

    senders = [threading.Thread(target=send) for _ in range(6)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    refused = [r for r in results if r.status_code == 429]
    assert refused, [r.status_code for r in results]
    error = expect_error(refused[0], 429, "requests", "engine_queue_share_exceeded")
    assert "retry-after" in refused[0].headers, refused[0].headers
    print("refused past the share:", error["message"])


if __name__ == "__main__":
    main()
