"""The gateway in front of an external engine (llama.cpp's llama-server,
`[engine] kind = "openai_http"`): the openai SDK's calls work through it, the
gateway's own limits and policy still apply, playground logging and feedback
reach the streams, what the upstream cannot do is refused by name, and an
upstream killed mid-stream ends the stream with a clean error event."""

import json
import os
import signal

import httpx

from common import (accept_consent, client, create_key, expect_error, get, model_id, ok, playground, post,
                    redis_client, stream_events)

CHECKPOINT = os.environ["EXPECT_CHECKPOINT"]
UPSTREAM_PID = int(os.environ["UPSTREAM_PID"])
C = "/v1/completions"

api = create_key(user="ext-api", scopes=["completions"])["secret"]
c = client(api)
model = model_id(c)

# The SDK's calls, whole and streamed; the fingerprint names the weights the upstream serves.
chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
                                 temperature=0)
assert chat.choices[0].finish_reason in ("stop", "length"), chat
assert chat.system_fingerprint == CHECKPOINT, chat.system_fingerprint
assert chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 8, chat.usage
completion = c.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
assert completion.system_fingerprint == CHECKPOINT and completion.usage.completion_tokens <= 6, completion
again = c.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
assert again.choices[0].text == completion.choices[0].text, "greedy decoding repeats through the upstream"
two = c.completions.create(model=model, prompt=["one", "two"], n=2, max_tokens=3, seed=5)
assert sorted(ch.index for ch in two.choices) == [0, 1, 2, 3], two
echo = c.completions.create(model=model, prompt="Echo me", echo=True, max_tokens=2, temperature=0)
assert echo.choices[0].text.startswith("Echo me"), echo
ok("chat and completions (n, several prompts, echo) through the upstream, fingerprinted")

streamed, finish, fingerprints = "", None, set()
for chunk in c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count."}],
                                       max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}):
    fingerprints.add(chunk.system_fingerprint)
    if chunk.choices:
        streamed += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    elif chunk.usage:
        assert 0 < chunk.usage.completion_tokens <= 10, chunk.usage
assert finish in ("stop", "length") and fingerprints == {CHECKPOINT}, (finish, fingerprints)
whole = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count."}], max_tokens=10,
                                  temperature=0)
assert streamed == whole.choices[0].message.content, (streamed, whole.choices[0].message.content)
ok("streaming chat equals the whole answer")

# Refused by name, not faked.
e = expect_error(post(C, api, {"model": model, "prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 1}), 400,
                 "invalid_request_error", None, "echo")
assert "external engine" in e["message"], e
expect_error(post(C, api, {"model": model, "prompt": "x", "logprobs": 2, "max_tokens": 1}), 400,
             "invalid_request_error", None, "logprobs")
expect_error(post(C, api, {"model": model, "prompt": "x", "best_of": 3, "max_tokens": 1}), 400,
             "invalid_request_error", None, "best_of")
ok("echo with logprobs, logprobs and best_of refused by name")

# The gateway's own limits and policy apply before anything reaches the upstream.
limited = create_key(scopes=["completions"], limits={"requests_per_minute": 2, "tokens_per_minute": 0,
                                                     "max_concurrent": 0})["secret"]
for _ in range(2):
    assert post(C, limited, {"model": model, "prompt": "hi", "max_tokens": 1}).status_code == 200
expect_error(post(C, limited, {"model": model, "prompt": "hi", "max_tokens": 1}), 429, "requests",
             "rate_limit_exceeded")
summ = create_key(scopes=["completions"], use_cases=["summarization"])["secret"]
expect_error(post(C, summ, {"model": model, "prompt": "Write a short story about a dragon.", "max_tokens": 2}),
             403, "permission_error", "use_case_not_allowed")
expect_error(post(C, api, {"model": model, "prompt": "x", "max_tokens": 100000}), 400, "invalid_request_error",
             None, "max_tokens")
ok("rate limit, use-case policy and context length enforced by the gateway")

# Playground logging and feedback reach the streams.
alice = create_key(user="ext-alice", scopes=["playground", "completions"])["secret"]
accept_consent(alice)
logged = playground(alice, model, "Write a haiku about autumn.")
assert logged["logged"] is True and len(logged["samples"]) == 4, logged
r = redis_client()
prompts = [e for _, _, e in stream_events(r, "instructd:prompts") if e.get("prompt_id") == logged["prompt_id"]]
assert len(prompts) == 1, prompts
gens = [s["generation_id"] for s in logged["samples"]]
res = post("/v1/feedback", alice, {"type": "rating", "generation_id": gens[0], "score": 5})
assert res.status_code == 201, res.text
feedback = [e["payload"] for _, _, e in stream_events(r, "instructd:feedback")]
assert [p for p in feedback if p["type"] == "rating" and p.get("generation_id") == gens[0]], feedback
ok("playground samples logged and feedback recorded")

# Upstream health, load and errors in /readyz and /metrics.
ready = httpx.get(f"{os.environ['INSTRUCTD_URL']}/readyz", timeout=30).json()
upstreams = ready["engine"]["upstreams"]
assert ready["status"] == "ready" and len(upstreams) == 1 and upstreams[0]["healthy"], ready
assert upstreams[0]["requests"] > 0 and upstreams[0]["in_flight"] == 0, upstreams
metrics = httpx.get(f"{os.environ['INSTRUCTD_URL']}/metrics", timeout=30).text
assert 'instructd_upstream_requests_total{upstream="' in metrics and 'outcome="ok"' in metrics
assert "instructd_upstream_time_to_first_token_seconds" in metrics
ok("/readyz and /metrics report the upstream")

# The upstream killed mid-stream: an error event, then the stream ends (no hang, no [DONE] pretending success).
events, killed = [], False
with httpx.stream("POST", f"{os.environ['INSTRUCTD_URL']}{C}", headers={"Authorization": f"Bearer {api}"},
                  json={"model": model, "prompt": "Tell me everything.", "max_tokens": int(os.environ["LONG_TOKENS"]),
                        "temperature": 0, "stream": True}, timeout=60) as response:
    assert response.status_code == 200, response.read()
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        events.append(line[6:])
        if not killed:
            os.kill(UPSTREAM_PID, signal.SIGKILL)
            killed = True
assert events[-1] != "[DONE]", events[-3:]
error = json.loads(events[-1])["error"]
assert error["type"] == "server_error" and "upstream" in error["message"], error
finished = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e).get("choices")]
assert not any(finished), "the killed generation reported no normal finish"
ok(f"upstream killed after the first chunk: {len(events) - 1} chunks, then {error['message']!r}")

# With no upstream left: a clean OpenAI error, never a hang, and /readyz says so once the probe sees it.
r = post(C, api, {"model": model, "prompt": "hi", "max_tokens": 2})
# 500 while the health probe has not yet seen the upstream go; 503 (refused before queueing) once it has.
e = expect_error(r, r.status_code if r.status_code in (500, 503) else 503, "server_error", r.json()["error"]["code"])
assert "upstream" in e["message"], e
ok("a request with the upstream down fails cleanly")
