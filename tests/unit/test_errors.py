"""The one error mapping: every exception becomes an OpenAI-shaped body with the right status and headers."""
from __future__ import annotations

import json
import pickle

import pytest
from fastapi.exceptions import RequestValidationError
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve._private.common import DeploymentID
from starlette.exceptions import HTTPException

from serve_app.serving import errors
from serve_app.serving.errors import to_api_error


def body_of(api_error) -> dict:
    body = json.loads(api_error.to_json())
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("exc, status, error_type", [
    (errors.InvalidRequestError("bad", param="input"), 400, "invalid_request_error"),
    (errors.AuthenticationError("no key"), 401, "authentication_error"),
    (errors.VoiceNotFoundError("no such voice"), 404, "not_found_error"),
    (errors.PayloadTooLargeError("big", param="file"), 413, "invalid_request_error"),
    (errors.UnsupportedMediaError("what", param="file"), 415, "invalid_request_error"),
    (errors.UnprocessableError("short"), 422, "invalid_request_error"),
    (errors.RateLimitedError("slow down", retry_after_s=2), 429, "rate_limit_error"),
    (errors.ServiceUnavailableError("down", retry_after_s=0.2), 503, "service_unavailable_error"),
    (RuntimeError("boom"), 500, "internal_server_error"),
])
def test_status_and_type(exc, status, error_type):
    api_error = to_api_error(exc)
    assert api_error.status_code == status
    assert body_of(api_error)["type"] == error_type


def test_voice_not_found_names_the_param():
    err = body_of(to_api_error(errors.VoiceNotFoundError("Voice 'x' not found.")))
    assert err == {"message": "Voice 'x' not found.", "type": "not_found_error", "param": "voice",
                   "code": "voice_not_found"}


def test_retry_after_is_rounded_up():
    assert to_api_error(errors.ServiceUnavailableError("down", retry_after_s=0.2)).headers == {"Retry-After": "1"}
    assert to_api_error(errors.RateLimitedError("x", retry_after_s=2.5)).headers == {"Retry-After": "3"}
    assert to_api_error(errors.InvalidRequestError("x", retry_after_s=5)).headers == {}


def test_backpressure_is_429_with_retry_after():
    api_error = to_api_error(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    assert api_error.status_code == 429
    assert api_error.headers["Retry-After"] == "1"
    assert body_of(api_error)["code"] == "backpressure"


def test_deployment_unavailable_is_503():
    api_error = to_api_error(DeploymentUnavailableError(DeploymentID(name="T3Stage", app_name="tts")))
    assert api_error.status_code == 503 and "Retry-After" in api_error.headers
    assert "T3Stage" in body_of(api_error)["message"]


def test_stage_errors_are_unwrapped_from_ray_task_error():
    cause = errors.VoiceNotFoundError("Voice 'v1' not found.")
    wrapped = RayTaskError("get_conds", "traceback...", cause).as_instanceof_cause()
    api_error = to_api_error(wrapped)
    assert api_error.status_code == 404
    assert body_of(api_error)["message"] == "Voice 'v1' not found."


def test_errors_pickle_with_their_fields():
    exc = errors.RateLimitedError("slow", param="p", code="c", retry_after_s=3)
    back = pickle.loads(pickle.dumps(exc))
    assert (type(back), back.message, back.param, back.code, back.retry_after_s) == (
        errors.RateLimitedError, "slow", "p", "c", 3)
    assert pickle.loads(pickle.dumps(errors.VoiceNotFoundError("x"))).code == "voice_not_found"


def test_validation_error_is_422_with_param():
    exc = RequestValidationError([{"loc": ("body", "speed"), "msg": "Input should be less than or equal to 4",
                                   "type": "less_than_equal"}])
    err = body_of(api_error := to_api_error(exc))
    assert api_error.status_code == 422
    assert err["param"] == "speed" and err["code"] == "validation_error" and "speed" in err["message"]


def test_http_exception_keeps_status():
    api_error = to_api_error(HTTPException(status_code=404, detail="Not Found"))
    assert api_error.status_code == 404 and body_of(api_error)["type"] == "not_found_error"


def test_sse_error_event_shape():
    event = to_api_error(errors.InvalidRequestError("bad")).to_sse_event()
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    payload = json.loads(event[len(b"data: "):])
    assert payload["type"] == "error" and payload["error"]["message"] == "bad"


def test_a_dead_replica_is_503_without_rays_internals():
    from ray.exceptions import ActorDiedError

    api_error = to_api_error(ActorDiedError())
    message = body_of(api_error)["message"]
    assert api_error.status_code == 503 and body_of(api_error)["code"] == "stage_unavailable"
    assert "\n" not in message and "retry" in message
    assert errors.is_replica_lost(ActorDiedError())
    assert errors.is_replica_lost(RayTaskError("synthesize", "tb", ActorDiedError()).as_instanceof_cause())
    assert not errors.is_replica_lost(DeploymentUnavailableError(DeploymentID(name="T3Stage", app_name="tts")))
    assert not errors.is_replica_lost(errors.StageError("T3 failed"))
