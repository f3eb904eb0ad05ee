"""The Responses API through the unmodified `openai` client: responses.create
(whole and streamed, the stream helper too), instructions and metadata,
previous_response_id, stored responses (retrieve, delete, store false), a
key reading only its own user's responses, refused fields, and the scope."""

import openai

from common import client, create_key, expect_error, model_id, ok, post

alice = client(create_key(user="alice")["secret"])
alice_again = client(create_key(user="alice")["secret"])
bob = client(create_key(user="bob")["secret"])
model = model_id(alice)

r = alice.responses.create(
    model=model, input="Hello", instructions="Be brief.", max_output_tokens=8, temperature=0, metadata={"run": "e2e"}
)
assert r.object == "response" and r.id.startswith("resp_"), r
assert r.status in ("completed", "incomplete"), r
assert r.instructions == "Be brief." and r.metadata == {"run": "e2e"} and r.store is not False, r
assert len(r.output) == 1 and r.output[0].type == "message" and r.output[0].role == "assistant", r
assert r.output[0].content[0].type == "output_text" and r.output_text == r.output[0].content[0].text, r
assert 0 < r.usage.output_tokens <= 8 and r.usage.input_tokens > 0, r.usage
assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
if r.status == "incomplete":
    assert r.incomplete_details.reason == "max_output_tokens", r
first = r
ok("responses.create")

raw = alice.responses.with_raw_response.create(model=model, input="Hi", max_output_tokens=2)
assert int(raw.headers["x-ratelimit-limit-requests"]) > 0, raw.headers
ok("rate-limit headers")

events = list(alice.responses.create(model=model, input="Hello", max_output_tokens=8, temperature=0, stream=True))
kinds = [e.type for e in events]
assert kinds[:4] == [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
], kinds
assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"], kinds
assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert [e.sequence_number for e in events] == list(range(len(events))), events
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
done = next(e for e in events if e.type == "response.output_text.done")
final = events[-1].response
assert deltas == done.text == final.output_text, (deltas, done.text, final.output_text)
assert final.output_text == first.output_text, "greedy: streamed and whole agree"
assert final.usage.output_tokens == first.usage.output_tokens, (final.usage, first.usage)
assert events[0].response.status == "in_progress" and events[0].response.id == final.id
ok("responses.create stream=True")

# The helper accumulates a snapshot from the events (its get_final_response() wants `response.completed`, which a
# response cut by max_output_tokens ends with `response.incomplete` instead, as OpenAI's does).
with alice.responses.stream(model=model, input="Hello", max_output_tokens=8, temperature=0) as stream:
    helper_events = list(stream)
texts = [e.delta for e in helper_events if e.type == "response.output_text.delta"]
assert "".join(texts) == helper_events[-1].response.output_text == first.output_text, (texts, helper_events[-1])
ok("responses.stream helper")

follow = alice.responses.create(
    model=model, input="And then?", previous_response_id=first.id, max_output_tokens=8, temperature=0
)
assert follow.previous_response_id == first.id, follow
assert follow.instructions is None, "instructions are not carried over"
# The same conversation sent in full (the first turn's instructions left out, as OpenAI does) reads the same tokens
# and, greedy, answers the same.
explicit = alice.responses.create(
    model=model,
    input=[
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": [{"type": "input_text", "text": "And then?"}]},
    ],
    max_output_tokens=8,
    temperature=0,
    store=False,
)
assert follow.usage.input_tokens == explicit.usage.input_tokens, (follow.usage, explicit.usage)
assert follow.output_text == explicit.output_text, (follow.output_text, explicit.output_text)
assert follow.usage.input_tokens > first.usage.input_tokens, (follow.usage, first.usage)
ok("previous_response_id continues the conversation")

streamed = alice.responses.create(model=model, input="Stream me", max_output_tokens=4, stream=True)
streamed_final = list(streamed)[-1].response
got = alice.responses.retrieve(streamed_final.id)
assert got.output_text == streamed_final.output_text and got.status == streamed_final.status, got
ok("a streamed response is stored")

got = alice.responses.retrieve(first.id)
assert got.id == first.id and got.output_text == first.output_text and got.usage == first.usage, got
assert alice_again.responses.retrieve(first.id).id == first.id, "another key of the same user reads it"
for call in (
    lambda: bob.responses.retrieve(first.id),
    lambda: bob.responses.delete(first.id),
    lambda: bob.responses.create(model=model, input="x", previous_response_id=first.id, max_output_tokens=2),
    lambda: alice.responses.retrieve(explicit.id),
    lambda: alice.responses.retrieve("resp_not-an-id"),
):
    try:
        call()
        raise AssertionError("expected 404")
    except openai.NotFoundError as e:
        assert e.body["code"] == "not_found", e.body
ok("a key reads only its own user's responses; store=false is not stored")

assert alice.responses.delete(first.id) is None
for call in (lambda: alice.responses.retrieve(first.id), lambda: alice.responses.delete(first.id)):
    try:
        call()
        raise AssertionError("expected 404")
    except openai.NotFoundError:
        pass
ok("responses.delete")

refused = [
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]}, "tools"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"background": True}, "background"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "{}"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "only assistants said this"}]}]},
     "input[0].content[0].type"),
]
for fields, param in refused:
    body = {"model": model, "input": "Hello", "max_output_tokens": 2, **fields}
    try:
        alice.responses.create(**body)
        raise AssertionError(f"{param} should be refused")
    except openai.BadRequestError as e:
        assert e.body["param"] == param and e.body["code"] == "unsupported_parameter", (param, e.body)
ok("fields it cannot honour are refused by name")

playground_only = create_key(user="carol", scopes=["playground"])["secret"]
expect_error(post("/v1/responses", playground_only, {"model": model, "input": "x"}), 403, "permission_error",
             "insufficient_scope")
expect_error(post("/v1/responses", None, {"model": model, "input": "x"}), 401, "invalid_request_error",
             "invalid_api_key")
expect_error(post("/v1/responses", create_key(user="dave")["secret"], {"model": "nope", "input": "x"}), 404,
             "invalid_request_error", "model_not_found", "model")
ok("scope, key and model checks")
