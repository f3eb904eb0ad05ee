"""Schemathesis hooks for the contract gate (tests/e2e/schemathesis.toml).

openapi.yaml describes every deployment; a run talks to one. These hooks give
generated requests the facts of the deployment under test that a schema cannot
state, and nothing else:

- `model` is the served model's id (any other name is a documented 404);
- in schema-valid requests, token ids lie inside the model's vocabulary and
  `max_tokens` leaves the prompt room in its context (both documented 400s),
  and `max_tokens` is kept small so the run stays short;
- a schema-valid prompt longer than the model's context (512 tokens for the
  tiny model) is refused with the documented 400; that refusal is not a finding;
- the run never suspends or revokes the keys it authenticates with.

The values come from the environment tests/schemathesis.rs sets.
"""

import os

import schemathesis
from schemathesis import GenerationMode

MODEL = os.environ["INSTRUCTD_MODEL_ID"]
VOCAB = int(os.environ["INSTRUCTD_VOCAB_SIZE"])
# Small enough that a prompt always fits beside it in the tiny model's context
# (512), and that a request of 32 prompts x 20 samples stays quick.
MAX_TOKENS = 8
# Key ids this run authenticates with: suspending or revoking them would turn
# every later request into a 401 / 403.
OWN_KEYS = set(os.environ["INSTRUCTD_OWN_KEY_IDS"].split(","))

TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _positive(case):
    return case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _clamp_tokens(prompt):
    """Token-id prompts (a list of ids, or a list of such lists) into the vocabulary."""
    if isinstance(prompt, list):
        return [_clamp_tokens(p) if isinstance(p, list) else (int(p) % VOCAB if _is_number(p) else p) for p in prompt]
    return prompt


@schemathesis.hook
def before_call(context, case, kwargs):
    operation = case.operation
    if operation.path.startswith("/v1/") and isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL
        if _positive(case):
            for field in TOKEN_FIELDS:
                # Integer fields may come as integral floats (`28.0`), which the server takes.
                value = case.body.get(field)
                if _is_number(value) and value > MAX_TOKENS:
                    case.body[field] = MAX_TOKENS
            if "prompt" in case.body:
                case.body["prompt"] = _clamp_tokens(case.body["prompt"])
    if operation.path.startswith("/admin/keys/") and isinstance(case.path_parameters, dict):
        # Stateful links can take ids from `GET /admin/keys`, where the run's own keys are listed.
        if case.path_parameters.get("id") in OWN_KEYS:
            case.path_parameters["id"] = "key_not_this_runs_own"


@schemathesis.hook
def filter_failure(context, failure, case, response):
    # The context length is the deployment's, and no schema can bound a prompt's tokens.
    return not (response.status_code == 400 and "maximum context length" in response.text)
