"""Phase 'before': a consented prompt with 4 samples. Phase 'down' (Redis
stopped): feedback is accepted into the on-disk spill, a retry with the same
Idempotency-Key included. Phase 'up': every event reaches the stream exactly once."""

import json
import os
import time

from common import accept_consent, create_key, client, model_id, ok, playground, post, redis_client

state_file = os.environ["INSTRUCTD_STATE_FILE"]
phase = os.environ["PHASE"]

if phase == "before":
    secret = create_key(user="olga", scopes=["playground", "completions"])["secret"]
    accept_consent(secret)
    p = playground(secret, model_id(client(secret)), "Write a limerick about Redis.")
    assert p["logged"]
    json.dump({"secret": secret, "prompt_id": p["prompt_id"], "gens": [s["generation_id"] for s in p["samples"]]},
              open(state_file, "w"))
    ok("logged a prompt before the outage")
elif phase == "down":
    s = json.load(open(state_file))
    g = s["gens"]
    bodies = [
        ("k-rank", {"type": "ranking", "prompt_id": s["prompt_id"], "ranking": [[g[3]], [g[2]], [g[1], g[0]]]}),
        ("k-rate", {"type": "rating", "generation_id": g[1], "score": 2, "flags": {"harmful_advice": True}}),
        ("k-cmp", {"type": "comparison", "prompt_id": s["prompt_id"], "better": g[3], "worse": g[0]}),
        ("k-demo", {"type": "demonstration", "prompt_id": s["prompt_id"], "response": "There once was a store..."}),
        ("k-rank", {"type": "ranking", "prompt_id": s["prompt_id"], "ranking": [[g[3]], [g[2]], [g[1], g[0]]]}),
    ]
    ids = []
    for key, body in bodies:
        res = post("/v1/feedback", s["secret"], body, headers={"Idempotency-Key": key})
        assert res.status_code == 200 and res.json()["status"] == "queued", res.text
        ids.append(res.json()["id"])
    assert ids[0] == ids[4], "a retry carries the same event id"
    s["ids"] = sorted(set(ids))
    json.dump(s, open(state_file, "w"))
    ok("feedback accepted into the spill while Redis is down")
elif phase == "up":
    s = json.load(open(state_file))
    r = redis_client()
    deadline = time.monotonic() + 15
    while True:
        events = [json.loads(f["event"]) for _, f in r.xrange("instructd:feedback")]
        if len(events) >= len(s["ids"]):
            break
        assert time.monotonic() < deadline, f"only {len(events)} of {len(s['ids'])} events replayed"
        time.sleep(0.2)
    time.sleep(1.5)
    events = [json.loads(f["event"]) for _, f in r.xrange("instructd:feedback")]
    assert sorted(e["event_id"] for e in events) == s["ids"], (events, s["ids"])
    assert [e["payload"]["type"] for e in events] == ["ranking", "rating", "comparison", "demonstration"]
    ok("every spilled event is in the stream exactly once, in order")
print("all passed")
