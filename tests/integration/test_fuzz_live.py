"""Schemathesis against the live app's OpenAPI schema (real Ray Serve, real stages), bounded: no 5xx and every
error OpenAI-shaped. The thorough run over fake stages is tests/unit/test_openapi_fuzz.py; this one checks that
what the real stages add (tokenizers, codecs, voices) keeps those promises too."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from serve_fixture import API_KEY

pytestmark = pytest.mark.timeout(600)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 12  # per operation; a speech example that is accepted costs a second or more on CPU


def openai_shaped_error(ctx, response, case) -> bool | None:
    if response.status_code < 400:
        return None
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return True


def live_operations(base_url: str) -> list:
    """The live schema's operations, but DELETE (never delete a voice another test enrolled)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=AUTH, timeout=60)
    return [result.ok() for result in schema.get_all_operations() if result.ok().method.upper() != "DELETE"]


def test_live_api_under_fuzzing(serve_app_instance):
    # schemathesis' lazy pytest fixture fails on pytest 9 ("'Function' object has no attribute '_nodeid'"):
    # hypothesis drives each operation here instead
    operations = live_operations(serve_app_instance.base_url)
    assert {op.label for op in operations} >= {"POST /v1/audio/speech", "POST /v1/voices", "GET /v1/models"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def fuzz(case):
            case.call_and_validate(headers=AUTH, timeout=120, checks=[not_a_server_error, openai_shaped_error])

        fuzz()
