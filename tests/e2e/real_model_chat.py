"""The default model behind the gateway answers a factual question."""

from common import client, create_key, model_id, ok

c = client(create_key(scopes=["completions"])["secret"])
model = model_id(c)
r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                              max_tokens=24, temperature=0)
answer = r.choices[0].message.content
assert "Paris" in answer, answer
ok(f"chat with {model}: {answer!r}")
print("all passed")
