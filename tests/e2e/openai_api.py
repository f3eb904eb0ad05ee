"""The OpenAI surface through the unmodified `openai` client: completions,
chat, streaming, n > 1, best_of, logprobs + echo, stop, seed reproducibility,
several prompts per call, system_fingerprint and rate-limit headers."""

from common import client, create_key, model_id, ok

key = create_key(scopes=["completions"])
c = client(key["secret"])
model = model_id(c)
ok("models.list")
assert c.models.retrieve(model).id == model
ok("models.retrieve")

r = c.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
assert r.object == "text_completion" and len(r.choices) == 1
choice = r.choices[0]
assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 8
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
assert r.system_fingerprint, r
greedy = choice.text
ok("completion")

raw = c.completions.with_raw_response.create(model=model, prompt="Hi", max_tokens=2)
assert int(raw.headers["x-ratelimit-limit-requests"]) > 0, raw.headers
assert "x-ratelimit-remaining-tokens" in raw.headers and raw.headers.get("x-request-id"), raw.headers
ok("rate-limit and request-id headers")

again = c.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
assert again.choices[0].text == greedy
ok("greedy is deterministic")

a = c.completions.create(model=model, prompt="The sea", max_tokens=12, n=3, temperature=1.0, seed=42)
b = c.completions.create(model=model, prompt="The sea", max_tokens=12, n=3, temperature=1.0, seed=42)
assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
assert len({ch.text for ch in a.choices}) > 1, "n samples with one seed should still differ from each other"
ok("n > 1 with seed is reproducible")

r = c.completions.create(model=model, prompt="The sea", max_tokens=6, n=1, best_of=3, temperature=1.0, seed=1)
assert len(r.choices) == 1 and r.choices[0].index == 0
ok("best_of")

prompt = "Roses are red"
r = c.completions.create(model=model, prompt=prompt, max_tokens=4, logprobs=2, echo=True, temperature=0)
lp = r.choices[0].logprobs
assert r.choices[0].text.startswith(prompt)
n_prompt = r.usage.prompt_tokens
assert len(lp.tokens) == n_prompt + r.usage.completion_tokens, (lp.tokens, r.usage)
assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
assert all(x <= 0 for x in lp.token_logprobs[1:])
assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])
assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
assert "".join(lp.tokens) == r.choices[0].text
ok("logprobs + echo")

r = c.completions.create(model=model, prompt=prompt, max_tokens=0, logprobs=0, echo=True)
assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
ok("echo with max_tokens 0 scores the prompt")

long = c.completions.create(model=model, prompt="Hello world", max_tokens=24, temperature=0).choices[0].text
if len(long) > 6:
    stop = long[3:6]
    r = c.completions.create(model=model, prompt="Hello world", max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].finish_reason == "stop", r
    assert stop not in r.choices[0].text and long.startswith(r.choices[0].text), (r.choices[0].text, stop, long)
    ok("stop sequences")

pieces, finish = [], None
usage = None
for chunk in c.completions.create(
    model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        pieces.append(ch.text)
        finish = ch.finish_reason or finish
assert "".join(pieces) == greedy, (pieces, greedy)
assert finish in ("stop", "length") and usage is not None and usage.completion_tokens <= 8
ok("completion streaming equals the whole response, with usage")

r = c.completions.create(model=model, prompt=["one", "two"], max_tokens=3, n=2, temperature=1, seed=3)
assert sorted(ch.index for ch in r.choices) == [0, 1, 2, 3]
ok("several prompts per call")

r = c.chat.completions.create(
    model=model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
    max_tokens=8, temperature=0,
)
assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
assert isinstance(r.choices[0].message.content, str) and r.system_fingerprint
chat_text = r.choices[0].message.content
ok("chat")

roles, pieces = [], []
for chunk in c.chat.completions.create(
    model=model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
    max_tokens=8, temperature=0, stream=True,
):
    assert chunk.object == "chat.completion.chunk"
    for ch in chunk.choices:
        if ch.delta.role:
            roles.append(ch.delta.role)
        if ch.delta.content:
            pieces.append(ch.delta.content)
assert roles == ["assistant"] and "".join(pieces) == chat_text, (roles, pieces, chat_text)
ok("chat streaming")

r = c.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Count"}], max_tokens=4, logprobs=True, top_logprobs=2, n=2,
    temperature=1, seed=9,
)
assert len(r.choices) == 2
for ch in r.choices:
    assert ch.logprobs.content and all(len(t.top_logprobs) == 2 for t in ch.logprobs.content)
ok("chat logprobs and n")
print("all passed")
