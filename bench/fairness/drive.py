"""Drives one fairness measurement against a running gateway (bench/fairness/run.sh).

A victim key sends streamed 1-token completions one at a time; its time to
first token (TTFT) is measured on the idle engine, then while a flooder key
keeps `--flood-concurrency` requests of `--flood-prompts` prompts with
`n = --flood-n` in flight (retrying a refused one after its Retry-After, as
OpenAI's client does). The flooder streams, so its throughput
is counted token by token over the measured window (the victim sends for
`--window` seconds, at least `--flood-samples` requests). Prints one JSON object.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

PROMPT = "Write a long story about a lighthouse keeper who finds a map."


def post(url, secret, body, stream):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    return conn, conn.getresponse()


def events(response):
    """The `data:` payloads of a Server-Sent Events stream."""
    for raw in response:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            if data == "[DONE]":
                return
            yield json.loads(data)


def victim_ttft(url, secret, model):
    """Seconds from sending a streamed 1-token completion to its first token."""
    body = {"model": model, "prompt": "Say hi", "max_tokens": 1, "temperature": 0, "stream": True}
    started = time.monotonic()
    conn, response = post(url, secret, body, True)
    try:
        if response.status != 200:
            raise RuntimeError(f"victim request failed: {response.status} {response.read()[:300]!r}")
        for event in events(response):
            if any(c.get("text") for c in event.get("choices", [])):
                return time.monotonic() - started
        raise RuntimeError("victim stream ended without a token")
    finally:
        conn.close()


class Flooder:
    def __init__(self, url, secret, model, args):
        self.url, self.secret = url, secret
        self.body = {
            "model": model,
            "prompt": [f"{PROMPT} ({i})" for i in range(args.flood_prompts)],
            "n": args.flood_n,
            "max_tokens": args.flood_max_tokens,
            "temperature": 1.0,
            "seed": 1,
            "stream": True,
        }
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.tokens = []  # monotonic time of every streamed token
        self.refused = 0
        self.completed = 0
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(args.flood_concurrency)]

    def start(self):
        for t in self.threads:
            t.start()

    def loop(self):
        while not self.stop.is_set():
            conn, response = post(self.url, self.secret, self.body, True)
            try:
                if response.status in (429, 503):
                    # As OpenAI's client does: wait as long as Retry-After says.
                    retry_after = float(response.getheader("retry-after") or 1)
                    response.read()
                    with self.lock:
                        self.refused += 1
                    self.stop.wait(retry_after)
                    continue
                if response.status != 200:
                    raise RuntimeError(f"flood request failed: {response.status} {response.read()[:300]!r}")
                for event in events(response):
                    n = sum(1 for c in event.get("choices", []) if c.get("text") is not None and c.get("finish_reason") is None)
                    if n:
                        now = time.monotonic()
                        with self.lock:
                            self.tokens.extend([now] * n)
                    if self.stop.is_set():
                        return
                with self.lock:
                    self.completed += 1
            finally:
                conn.close()

    def tokens_between(self, t0, t1):
        with self.lock:
            return sum(1 for t in self.tokens if t0 <= t < t1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--victim", required=True)
    p.add_argument("--flooder", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--idle-samples", type=int, default=5)
    p.add_argument("--flood-samples", type=int, default=2, help="victim requests under the flood, at least")
    p.add_argument("--window", type=float, default=60.0, help="seconds of flood measured, at least")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of flood before the first victim request")
    p.add_argument("--gap", type=float, default=2.0, help="seconds between victim requests under the flood")
    p.add_argument("--flood-concurrency", type=int, default=8)
    p.add_argument("--flood-prompts", type=int, default=32)
    p.add_argument("--flood-n", type=int, default=4)
    p.add_argument("--flood-max-tokens", type=int, default=16)
    p.add_argument("--idle-only", action="store_true")
    args = p.parse_args()

    victim_ttft(args.url, args.victim, args.model)  # warm-up
    idle = [victim_ttft(args.url, args.victim, args.model) for _ in range(args.idle_samples)]
    result = {"idle_ttft_s": idle}
    if not args.idle_only:
        flooder = Flooder(args.url, args.flooder, args.model, args)
        flooder.start()
        time.sleep(args.warmup)
        t0 = time.monotonic()
        flood = []
        while len(flood) < args.flood_samples or time.monotonic() - t0 < args.window:
            flood.append(victim_ttft(args.url, args.victim, args.model))
            time.sleep(args.gap)
        t1 = time.monotonic()
        flooder.stop.set()
        result.update(
            flood_ttft_s=flood,
            flood_window_s=t1 - t0,
            flood_tokens=flooder.tokens_between(t0, t1),
            flood_tok_s=flooder.tokens_between(t0, t1) / (t1 - t0),
            flood_refused=flooder.refused,
            flood_completed=flooder.completed,
        )
    result["idle_ttft_median_s"] = statistics.median(idle)
    if "flood_ttft_s" in result:
        result["flood_ttft_median_s"] = statistics.median(result["flood_ttft_s"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
