"""Schemathesis against the app's own OpenAPI schema, over fake stages: no 5xx, every error OpenAI-shaped,
responses as the schema documents them. Bounded: a fixed number of examples per operation, no deadline."""
from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from router_fakes import Stack
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

API_KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 50

stack = Stack(api_keys=[API_KEY], max_input_chars=400)
schema = schemathesis.openapi.from_asgi("/openapi.json", stack.app, headers=AUTH)


def openai_shaped_error(ctx, response, case) -> bool | None:
    """Every status >= 400 has the one error body: {"error": {message, type, param, code}}."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"], body
    return True


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_api_holds_its_schema_under_fuzzing(case):
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error, openai_shaped_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance])

