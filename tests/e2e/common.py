"""Shared pieces of the end-to-end scripts: the gateway's address, the admin
key, key creation through the admin API, and assertions on error bodies."""

import json
import os
import sys

import httpx
import openai

BASE = os.environ["INSTRUCTD_URL"]
ADMIN = os.environ["INSTRUCTD_ADMIN_KEY"]


def admin_headers():
    return {"Authorization": f"Bearer {ADMIN}"}


def create_key(base=BASE, **fields):
    body = {"user": fields.pop("user", "e2e-user"), "scopes": fields.pop("scopes", ["completions"]), **fields}
    r = httpx.post(f"{base}/admin/keys", json=body, headers=admin_headers(), timeout=30)
    assert r.status_code == 201, (r.status_code, r.text)
    key = r.json()
    assert key["secret"].startswith("sk-"), key
    return key


def client(secret, base=BASE):
    # max_retries=0: the client would otherwise retry 429 and 503 by itself.
    return openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, timeout=120)


def model_id(c):
    models = c.models.list().data
    assert len(models) == 1, models
    return models[0].id


def expect_error(response, status, kind, code, param="__any__"):
    """Checks an httpx response carries exactly OpenAI's error shape."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == kind, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    if param != "__any__":
        assert error["param"] == param, error
    return error


def post(path, secret, body=None, content=None, headers=None, base=BASE):
    h = {"Authorization": f"Bearer {secret}"} if secret else {}
    if content is not None:
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    return httpx.post(f"{base}{path}", json=body, content=content, headers=h, timeout=120)


def ok(name):
    print(f"ok  {name}")
    sys.stdout.flush()


def redis_client():
    import redis

    return redis.Redis.from_url(os.environ["INSTRUCTD_REDIS_URL"], decode_responses=True)


def stream_events(r, stream):
    """Every entry of `stream` as (id, fields, parsed event)."""
    return [(i, f, json.loads(f["event"])) for i, f in r.xrange(stream)]


def get(path, secret, base=BASE):
    return httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {secret}"}, timeout=120)


def accept_consent(secret, base=BASE):
    version = get("/v1/playground/notice", secret, base).json()["version"]
    r = post("/v1/playground/consent", secret, {"action": "accept", "notice_version": version}, base=base)
    assert r.status_code == 200 and r.json()["logging"] is True, r.text
    return version


def playground(secret, model, prompt, k=4, base=BASE, **extra):
    r = post("/v1/playground/completions", secret,
             {"model": model, "prompt": prompt, "k": k, "max_tokens": 6, "temperature": 1.0, **extra}, base=base)
    assert r.status_code == 200, r.text
    return r.json()
