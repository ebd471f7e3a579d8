"""The middleware in Ray's HTTP proxy (api/proxy_middleware.py), driven with fake inner apps standing in for the
proxy: a request whose router replica died before answering is sent again with the same body, or answered with an
OpenAI-shaped 503; a broken SSE stream ends with an error event, any other broken body stays cut off."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from ray.serve._private.http_util import validate_http_proxy_callback_return
from ray.serve._private.utils import call_function_from_import_path

from serve_app.envs import PROXY_MIDDLEWARES_IMPORT_PATH, RAY_PROXY_CALLBACK_ENV, ray_process_env
from serve_app.serving.api.proxy_middleware import ERROR_CODE, LostReplicaRetry
from serve_app.serving.launch.local_ray import ray_head_env

SPEECH = {"method": "POST", "path": "/v1/audio/speech", "headers": [(b"content-type", b"application/json")]}
BODY_PARTS = [b'{"input": "Hello', b' there", "response_format"', b': "pcm"}']
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


def http_scope(method: str = "POST", path: str = "/v1/audio/speech", headers: list | None = None) -> dict:
    return {"type": "http", "method": method, "path": path, "headers": list(headers or []), "query_string": b""}


class Client:
    """The server side of one connection: the body in parts, then nothing until the client hangs up."""

    def __init__(self, parts: list[bytes], hang_up: bool = False) -> None:
        self.parts = list(parts)
        self.hung_up = asyncio.Event()
        if hang_up:
            self.hung_up.set()
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        if self.parts:
            body = self.parts.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(self.parts)}
        await self.hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)


async def read_body(receive) -> bytes:
    data = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        data += message.get("body", b"")
        if not message.get("more_body", False):
            return data


class FakeProxy:
    """Stands in for Ray's proxy: reads the body, then does what `script` says for each call in turn."""

    def __init__(self, *script: str) -> None:
        self.script = list(script)
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        self.bodies.append(await read_body(receive))
        step = self.script[min(len(self.bodies), len(self.script)) - 1]
        if step == "silent":          # the replica died: the proxy sends nothing and returns
            return
        if step == "raise":
            raise RuntimeError("replica died")
        if step == "ok":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"audio/pcm")]})
            await send({"type": "http.response.body", "body": b"audio", "more_body": False})
            return
        if step in ("sse_break", "audio_break", "audio_break_raise"):
            content_type = b"text/event-stream" if step == "sse_break" else b"audio/pcm"
            first = b'data: {"type":"speech.audio.delta","audio":"AAAA"}\n\n' if step == "sse_break" else b"\x00\x01"
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            if step == "audio_break_raise":
                raise RuntimeError("replica died mid-stream")
            return
        if step in PROXY_ANSWERS:     # the proxy's own plain-text answer (Ray's convert_object_to_asgi_messages)
            status, text, extra = PROXY_ANSWERS[step]
            await send({"type": "http.response.start", "status": status,
                        "headers": [[b"content-type", b"text/plain; charset=utf-8"], *extra]})
            await send({"type": "http.response.body", "body": text.encode()})
            return
        if step == "app_503":         # the app's own error: JSON, passed through as it is
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b'{"error": {"code": "stage_unavailable"}}'})
            return
        raise AssertionError(step)


PROXY_ANSWERS = {
    "proxy_backpressure": (503, "Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4).",
                           [(b"retry-after", b"2")]),
    "proxy_timeout": (408, "Request 1a2b timed out after 30.0s.", []),
    "proxy_unavailable": (503, "Deployment 'SpeechIngress' is unavailable.", []),
}


def middleware(app) -> LostReplicaRetry:
    return LostReplicaRetry(app, backoff_s=(0.0, 0.0, 0.0))


def run(app, scope: dict, client: Client) -> None:
    asyncio.run(asyncio.wait_for(app(scope, client.receive, client.send), 10))


def assert_unavailable(sent: list[dict]) -> dict:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    start, body = sent
    assert start["status"] == 503
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    payload = json.loads(body["body"])
    assert set(payload) == {"error"} and set(payload["error"]) == OPENAI_ERROR_FIELDS
    assert payload["error"]["type"] == "service_unavailable_error" and payload["error"]["code"] == ERROR_CODE
    assert not body.get("more_body", False)
    return payload["error"]


def test_a_request_without_an_answer_is_sent_again_with_the_same_body():
    proxy = FakeProxy("silent", "raise", "ok")
    client = Client(BODY_PARTS)
    run(middleware(proxy), http_scope(**SPEECH), client)
    assert proxy.bodies == [b"".join(BODY_PARTS)] * 3                   # replayed identically each time
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    assert client.sent[0]["status"] == 200 and client.sent[1]["body"] == b"audio"


def test_retries_run_out_into_an_openai_shaped_503(caplog):
    proxy = FakeProxy("silent")
    client = Client(BODY_PARTS)
    with caplog.at_level("WARNING", logger="serve_app.serving.api.proxy_middleware"):
        run(middleware(proxy), http_scope(**SPEECH), client)
    assert len(proxy.bodies) == 1 + 3
    assert "stopped" in assert_unavailable(client.sent)["message"]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("retry" in line and "in 0.0s" in line for line in lines) == 3 and "answering 503" in lines[-1]


def test_the_request_id_goes_on_the_503():
    client = Client(BODY_PARTS)
    run(middleware(FakeProxy("silent")), http_scope(**{**SPEECH, "headers": [(b"x-request-id", b"req-7")]}), client)
    headers = dict(client.sent[0]["headers"])
    assert headers[b"x-request-id"] == b"req-7"


@pytest.mark.parametrize("method,path,headers", [
    ("POST", "/v1/voices", [(b"content-type", b"multipart/form-data; boundary=x")]),
    ("DELETE", "/v1/voices/voice_1", []),
    ("POST", "/v1/audio/speech", [(b"content-type", b"multipart/form-data; boundary=x")]),
])
def test_a_request_that_must_not_run_twice_gets_a_503_at_once(method, path, headers):
    proxy = FakeProxy("silent")
    client = Client([b"--x\r\npart\r\n--x--"])
    run(middleware(proxy), http_scope(method, path, headers), client)
    assert len(proxy.bodies) == 1
    assert_unavailable(client.sent)


def test_get_is_retried():
    proxy = FakeProxy("silent", "ok")
    client = Client([b""])
    run(middleware(proxy), http_scope("GET", "/v1/models"), client)
    assert len(proxy.bodies) == 2 and client.sent[0]["status"] == 200


def test_a_body_over_the_limit_is_passed_whole_and_not_retried():
    proxy = FakeProxy("silent")
    client = Client([b"a" * 600, b"b" * 600, b"c" * 600])
    run(LostReplicaRetry(proxy, backoff_s=(0.0, 0.0, 0.0), max_body_bytes=1000), http_scope(**SPEECH), client)
    assert proxy.bodies == [b"a" * 600 + b"b" * 600 + b"c" * 600]      # the kept part replayed, the rest forwarded
    assert_unavailable(client.sent)
    assert dict(client.sent[0]["headers"]).get(b"connection") == b"close"


def test_a_client_that_hung_up_is_not_retried():
    async def proxy(scope, receive, send):   # as Ray's: waits for the replica, sees the disconnect, cancels
        calls.append(await read_body(receive))
        assert (await receive())["type"] == "http.disconnect"

    calls: list[bytes] = []
    client = Client(BODY_PARTS, hang_up=True)
    run(middleware(proxy), http_scope(**SPEECH), client)
    assert calls == [b"".join(BODY_PARTS)] and client.sent == []


def test_a_broken_sse_stream_ends_with_an_error_event_and_a_clean_end():
    client = Client(BODY_PARTS)
    run(middleware(FakeProxy("sse_break")), http_scope(**SPEECH), client)
    assert [m["type"] for m in client.sent] == ["http.response.start"] + ["http.response.body"] * 2
    last = client.sent[-1]
    assert last["more_body"] is False
    events = [json.loads(line[len("data: "):]) for line in last["body"].decode().split("\n")
              if line.startswith("data: ")]
    assert len(events) == 1 and events[0]["type"] == "error"
    assert set(events[0]["error"]) == OPENAI_ERROR_FIELDS and events[0]["error"]["code"] == ERROR_CODE


@pytest.mark.parametrize("step", ["audio_break", "audio_break_raise"])
def test_a_broken_audio_body_stays_cut_off(step):
    proxy = FakeProxy(step)
    client = Client(BODY_PARTS)
    app = middleware(proxy)
    if step == "audio_break_raise":
        with pytest.raises(RuntimeError):   # the server closes the connection
            run(app, http_scope(**SPEECH), client)
    else:
        run(app, http_scope(**SPEECH), client)
    assert len(proxy.bodies) == 1                                                       # started: never again
    assert not any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in client.sent)


def test_websockets_and_lifespan_pass_through_untouched():
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["type"], receive, send))

    async def receive():
        raise AssertionError("not read")

    async def send(message):
        raise AssertionError("nothing sent")

    for kind in ("websocket", "lifespan"):
        asyncio.run(middleware(app)({"type": kind, "path": "/"}, receive, send))
    assert seen == [("websocket", receive, send), ("lifespan", receive, send)]


def test_ray_loads_the_middleware_from_the_declared_import_path():
    assert ray_process_env() == {RAY_PROXY_CALLBACK_ENV: PROXY_MIDDLEWARES_IMPORT_PATH}
    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(PROXY_MIDDLEWARES_IMPORT_PATH))
    assert [m.cls for m in middlewares] == [LostReplicaRetry]


def test_the_local_ray_head_gets_the_variable_and_keeps_an_explicit_one(caplog):
    assert ray_head_env({}) == {RAY_PROXY_CALLBACK_ENV: PROXY_MIDDLEWARES_IMPORT_PATH}
    with caplog.at_level("WARNING"):
        assert ray_head_env({RAY_PROXY_CALLBACK_ENV: "mine:hooks"}) == {RAY_PROXY_CALLBACK_ENV: "mine:hooks"}
    assert "keeping it" in caplog.text


def test_the_middleware_imports_no_torch():
    code = ("import sys, serve_app.serving.api.proxy_middleware; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('serve_app.engine')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_declared_length_over_the_limit_reads_nothing_up_front():
    async def proxy(scope, receive, send):   # as the app's BodySizeLimit: refuses before reading
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    client = Client([b"x" * 10])
    headers = [(b"content-type", b"application/json"), (b"content-length", b"5000")]
    run(LostReplicaRetry(proxy, max_body_bytes=1000), http_scope(headers=headers), client)
    assert client.parts == [b"x" * 10] and client.sent[0]["status"] == 413


@pytest.mark.parametrize("step,status,error_type,code,retry_after", [
    ("proxy_backpressure", 429, "rate_limit_error", "backpressure", "2"),   # as the app answers the same Ray error
    ("proxy_timeout", 408, "timeout_error", "request_timeout", None),
    ("proxy_unavailable", 503, "service_unavailable_error", ERROR_CODE, "1"),
])
def test_the_proxys_own_plain_text_answers_get_the_apps_error_model(step, status, error_type, code, retry_after):
    proxy = FakeProxy(step)
    client = Client(BODY_PARTS)
    run(middleware(proxy), http_scope(**SPEECH), client)
    assert len(proxy.bodies) == 1                                          # an answer: nothing is retried
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"], client.sent
    start, body = client.sent
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert start["status"] == status and headers["content-type"] == "application/json"
    assert headers.get("retry-after") == retry_after
    error = json.loads(body["body"])["error"]
    assert set(error) == OPENAI_ERROR_FIELDS and (error["type"], error["code"]) == (error_type, code)
    assert PROXY_ANSWERS[step][1].split(" (")[0].rstrip(".") in error["message"]   # Ray's reason is kept


def test_the_apps_own_errors_pass_through_untouched():
    client = Client(BODY_PARTS)
    run(middleware(FakeProxy("app_503")), http_scope(**SPEECH), client)
    assert client.sent[0]["status"] == 503 and b"stage_unavailable" in client.sent[1]["body"]
