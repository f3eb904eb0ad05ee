"""SIGTERM during a streamed completion: the stream still runs to its end
(finish_reason and [DONE]), and the gateway stops taking new connections."""

import os
import signal
import threading
import time

import httpx

from common import BASE, client, create_key, model_id, ok

c = client(create_key(scopes=["completions"])["secret"])
model = model_id(c)
stream = c.completions.create(model=model, prompt="Write a long story about a dragon who learns to fly.",
                              max_tokens=48, temperature=0, stream=True)
chunks = iter(stream)
first = next(chunks)
os.kill(int(os.environ["INSTRUCTD_PID"]), signal.SIGTERM)
finish = None
count = 1
for chunk in chunks:
    count += 1
    for ch in chunk.choices:
        finish = ch.finish_reason or finish
assert finish in ("stop", "length"), finish
assert count > 8, f"the stream ended after {count} chunks: too soon to show anything"
ok(f"in-flight stream finished after SIGTERM ({count} chunks, finish_reason {finish})")

deadline = time.monotonic() + 10
while True:
    try:
        httpx.get(f"{BASE}/healthz", timeout=1)
    except httpx.TransportError:
        break
    assert time.monotonic() < deadline, "the gateway still accepts connections 10 s after SIGTERM"
    time.sleep(0.1)
ok("no new connections after shutdown")
print("all passed")
