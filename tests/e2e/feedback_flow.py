"""Consent, playground logging, feedback validation, labeling and withdrawal,
then the consent-leak check: after mixed traffic every training stream holds
only consented playground entries."""

from common import (accept_consent, create_key, expect_error, get, model_id, client, ok, playground, post,
                    redis_client, stream_events)

alice = create_key(user="alice", scopes=["playground", "completions"])["secret"]
bob = create_key(user="bob", scopes=["playground", "completions"])["secret"]
api = create_key(user="carol", scopes=["completions"])["secret"]
labeler = create_key(user="lena", scopes=["labeler"], labeler_group="held_out")["secret"]
model = model_id(client(api))
r = redis_client()

# Before consent nothing is logged.
assert get("/v1/playground/consent", alice).json()["status"] == "none"
before = playground(alice, model, "Write a haiku about autumn.")
assert before["logged"] is False and before["not_logged_reason"] == "no_consent", before
expect_error(post("/v1/playground/consent", alice, {"action": "accept", "notice_version": "1999"}), 409,
             "invalid_request_error", "notice_version_not_current", "notice_version")
expect_error(post("/v1/playground/completions", api, {"model": model, "prompt": "x"}), 403, "permission_error",
             "insufficient_scope")
ok("nothing logged without consent")

version = accept_consent(alice)
logged = playground(alice, model, "Write a haiku about autumn.")
assert logged["logged"] is True and len(logged["samples"]) == 4, logged
gens = [s["generation_id"] for s in logged["samples"]]
pid = logged["prompt_id"]
ok("consented playground prompt logged with 4 samples")

# Mixed traffic that must never reach a training stream.
c = client(alice)
c.completions.create(model=model, prompt="Write a haiku about autumn.", max_tokens=3)
c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=3)
client(api).completions.create(model=model, prompt="Summarize: the cat sat.", max_tokens=3)
unconsented = playground(bob, model, "Brainstorm names for a cat.")
assert unconsented["logged"] is False

# Feedback: valid submissions.
res = post("/v1/feedback", alice, {"type": "ranking", "prompt_id": pid, "ranking": [[gens[2]], [gens[0], gens[1]], [gens[3]]]},
           headers={"Idempotency-Key": "rank-1"})
assert res.status_code == 201 and res.json()["status"] == "recorded", res.text
dup = post("/v1/feedback", alice, {"type": "ranking", "prompt_id": pid, "ranking": [[gens[2]], [gens[0], gens[1]], [gens[3]]]},
           headers={"Idempotency-Key": "rank-1"})
assert dup.status_code == 200 and dup.json()["status"] == "duplicate" and dup.json()["id"] == res.json()["id"], dup.text
res = post("/v1/feedback", alice, {"type": "rating", "generation_id": gens[0], "score": 6,
                                   "flags": {"hallucination": True}})
assert res.status_code == 201, res.text
res = post("/v1/feedback", alice, {"type": "comparison", "prompt_id": pid, "better": gens[1], "worse": gens[3]})
assert res.status_code == 201, res.text
res = post("/v1/feedback", alice, {"type": "demonstration", "prompt_id": pid, "response": "Leaves fall slowly."})
assert res.status_code == 201, res.text
ok("rating, ranking with ties, comparison, demonstration; idempotent retry")

# Feedback: refusals.
expect_error(post("/v1/feedback", alice, {"type": "rating", "generation_id": gens[0], "score": 8}), 400,
             "invalid_request_error", None, "score")
expect_error(post("/v1/feedback", alice, {"type": "rating", "generation_id": "prm_nope-0", "score": 3}), 404,
             "invalid_request_error", "not_found", "generation_id")
expect_error(post("/v1/feedback", alice, {"type": "ranking", "prompt_id": pid, "ranking": [[gens[0]], [gens[1]], [gens[2]]]}),
             400, "invalid_request_error", None, "ranking")
expect_error(post("/v1/feedback", alice, {"type": "ranking", "prompt_id": pid,
                                          "ranking": [[gens[0]], [gens[0]], [gens[1]], [gens[2]], [gens[3]]]}),
             400, "invalid_request_error", None, "ranking")
expect_error(post("/v1/feedback", alice, {"type": "comparison", "prompt_id": pid, "better": gens[0], "worse": gens[0]}),
             400, "invalid_request_error", None, "worse")
expect_error(post("/v1/feedback", alice, {"type": "comparison", "prompt_id": pid, "better": gens[0], "worse": "x-9"}),
             400, "invalid_request_error", None, "worse")
expect_error(post("/v1/feedback", bob, {"type": "rating", "generation_id": gens[0], "score": 3}), 403,
             "permission_error", "not_your_prompt")
expect_error(post("/v1/feedback", alice, {"type": "demonstration", "prompt": "my own prompt", "response": "x"}), 403,
             "permission_error", "insufficient_scope")
expect_error(post("/v1/feedback", alice, {"type": "vibes"}), 400, "invalid_request_error", None)
expect_error(post("/v1/feedback", api, {"type": "rating", "generation_id": gens[0], "score": 3}), 403,
             "permission_error", "insufficient_scope")
three = playground(alice, model, "Name three rivers.", k=3)
expect_error(post("/v1/feedback", alice, {"type": "ranking", "prompt_id": three["prompt_id"],
                                          "ranking": [[s["generation_id"]] for s in three["samples"]]}),
             400, "invalid_request_error", None, "ranking")
expect_error(post("/v1/playground/completions", alice, {"model": model, "prompt": "x", "k": 10}), 400,
             "invalid_request_error", None, "k")
ok("feedback refusals name the field")

# PII is flagged on the logged event.
pii = playground(alice, model, "Email me at jane.doe@example.com about the invoice.", k=2)
assert pii["logged"] and "email" in pii["pii"], pii

# Labeling queue: the labeler gets a logged prompt with its samples, judges it, moves on.
seen = set()
while True:
    task = get("/v1/labeling/next", labeler)
    if task.status_code == 204:
        break
    assert task.status_code == 200, task.text
    t = task.json()
    assert t["prompt_id"] not in seen, "a judged task came back"
    seen.add(t["prompt_id"])
    ids = [s["generation_id"] for s in t["samples"]]
    body = {"type": "demonstration", "prompt_id": t["prompt_id"], "response": "An ideal answer."}
    assert post("/v1/feedback", labeler, body).status_code == 201
# A prompt the PII screen flagged is never served to labelers (issue 13).
assert pid in seen and pii["prompt_id"] not in seen, (seen, pid)
res = post("/v1/feedback", labeler, {"type": "demonstration", "prompt": "Explain tides.", "response": "The moon..."})
assert res.status_code == 201 and res.json()["prompt_id"] is None, res.text
ok("labeling queue leases each logged prompt once per labeler, never one with personal data")

# The consent-leak check: every entry of every stream.
prompts = stream_events(r, "instructd:prompts")
assert prompts and all(f["kind"] == "prompt" for _, f, _ in prompts), prompts
assert {e["user"] for _, _, e in prompts} == {"alice"}, "only alice consented"
assert {e["prompt_id"] for _, _, e in prompts} == {pid, three["prompt_id"], pii["prompt_id"]}
assert all(e["consent_version"] == version for _, _, e in prompts)
event = next(e for _, _, e in prompts if e["prompt_id"] == pid)
assert [s["generation_id"] for s in event["samples"]] == gens and event["split"] in ("train", "validation", "test")
assert next(e for _, _, e in prompts if e["prompt_id"] == pii["prompt_id"])["pii"][0]["kind"] == "email"
feedback = stream_events(r, "instructd:feedback")
ranking = [e for _, _, e in feedback if e["payload"]["type"] == "ranking"]
assert len(ranking) == 1 and ranking[0]["payload"]["ranking"] == [[gens[2]], [gens[0], gens[1]], [gens[3]]]
assert all(e["labeler_group"] == "held_out" for _, _, e in feedback if e["labeler_id"] == "lena")
streams = {k for k in r.scan_iter(_type="STREAM")}
assert streams <= {"instructd:prompts", "instructd:feedback", "instructd:audit"}, streams
ok("consent leak check: only consented playground prompts in the training streams")

# Withdrawal removes what is still in the stream and stops logging at once.
res = post("/v1/playground/consent", alice, {"action": "withdraw"})
assert res.status_code == 200 and res.json()["removed"] == 3 and res.json()["logging"] is False, res.text
after = stream_events(r, "instructd:prompts")
assert [f["kind"] for _, f, _ in after] == ["withdrawal"], after
assert playground(alice, model, "Another prompt")["logged"] is False
expect_error(post("/v1/feedback", alice, {"type": "rating", "generation_id": gens[0], "score": 3}), 404,
             "invalid_request_error", "not_found")
ok("withdrawal removed 3 entries and stopped logging")
print("all passed")
