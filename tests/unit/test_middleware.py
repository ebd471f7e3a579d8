"""The app's middlewares over fake stages: API keys on every route but the probes (streams and SSE included, keys
never logged), and body limits that count the bytes that arrive (chunked bodies cut off at the limit)."""
from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from router_fakes import Stack

from serve_app.serving.api.middleware import MAX_JSON_BODY_BYTES, MULTIPART_OVERHEAD_BYTES

pytestmark = pytest.mark.anyio
KEYS = ["sk-first-secret-1234", "sk-second-secret-5678"]
OPEN = {"/healthz", "/readyz"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def client(stack: Stack, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app), base_url="http://test", **kwargs)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return error


def every_route(stack: Stack) -> list[tuple[str, str]]:
    """(method, concrete path) of every route: each operation of the OpenAPI schema, the schema and the docs."""
    out = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]
    for path, operations in stack.app.openapi()["paths"].items():
        concrete = path.replace("{model_id}", "chatterbox").replace("{voice_id}", "voice_x")
        out += [(method.upper(), concrete) for method in operations]
    return out


# -- API keys ---------------------------------------------------------------------------------------------------------

async def test_every_route_but_the_probes_needs_a_key():
    stack = Stack(api_keys=KEYS)
    routes = every_route(stack)
    assert {("POST", "/v1/audio/speech"), ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/v1/voices")} \
        <= set(routes)
    async with client(stack) as anonymous:
        for method, path in routes + [("GET", "/v1/nothing-here")]:
            response = await anonymous.request(method, path)
            if path in OPEN:
                assert response.status_code == 200, (path, response.text)
                continue
            err = assert_error(response, 401, code="missing_api_key")
            assert err["type"] == "authentication_error", path
        for method, path in routes:
            response = await anonymous.request(method, path, headers={"Authorization": "Bearer sk-wrong"})
            if path not in OPEN:
                assert_error(response, 401, code="invalid_api_key")
    async with client(stack, headers={"Authorization": f"Bearer {KEYS[1]}"}) as keyed:
        for method, path in routes:
            if method == "GET":
                assert (await keyed.get(path)).status_code != 401, path
        assert (await keyed.get("/v1/models")).status_code == 200
        assert (await keyed.get("/openapi.json")).status_code == 200


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic c2stZmlyc3Q6", "sk-first-secret-1234",
                                    "Bearer sk-first-secret-123", "Bearer sk-first-secret-12345"])
async def test_malformed_or_wrong_keys_are_401(header):
    stack = Stack(api_keys=KEYS)
    async with client(stack, headers={"Authorization": header} if header else {}) as c:
        assert_error(await c.get("/v1/models"), 401)


@pytest.mark.parametrize("body", [
    {"input": "Hello there."},                                   # streams by default
    {"input": "Hello there.", "stream": False},
    {"input": "Hello there.", "stream_format": "sse"},
])
async def test_speech_in_every_mode_needs_a_key_and_runs_with_one(body):
    stack = Stack(api_keys=KEYS)
    async with client(stack) as anonymous:
        response = await anonymous.post("/v1/audio/speech", json=body)
        assert_error(response, 401, code="missing_api_key")
        assert response.headers["content-type"] == "application/json"       # an error body, not a stream
        assert_error(await anonymous.post("/v1/audio/speech", json=body,
                                          headers={"Authorization": "Bearer nope"}), 401, code="invalid_api_key")
    assert not stack.t3.jobs                                                   # nothing ran
    async with client(stack, headers={"Authorization": f"Bearer {KEYS[0]}"}) as keyed:
        async with keyed.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200
            data = await response.aread()
        assert data
        if body.get("stream_format") == "sse":
            assert b"speech.audio.done" in data


async def test_keys_never_reach_logs_or_config(caplog):
    stack = Stack(api_keys=KEYS, max_chunk_chars=40)
    caplog.set_level(logging.DEBUG)
    async with client(stack, headers={"Authorization": f"Bearer {KEYS[0]}"}) as keyed:
        assert (await keyed.post("/v1/audio/speech", json={"input": "Say this. And this too, please."})).status_code \
            == 200
        config = (await keyed.get("/v1/config")).json()
        (await keyed.get("/openapi.json")).raise_for_status()
    async with client(stack, headers={"Authorization": f"Bearer {KEYS[1]}x"}) as wrong:
        assert (await wrong.get("/v1/config")).status_code == 401
    assert config["auth_enabled"] is True and "api_keys" not in config
    text = caplog.text + json.dumps(config)
    for key in KEYS:
        assert key not in text and key[3:] not in text


# -- body size --------------------------------------------------------------------------------------------------------

async def drive(app, path: str, chunks: list[bytes], headers: dict[str, str], method: str = "POST"):
    """Sends a request body in `chunks` (chunked: no Content-Length unless given); -> (response messages,
    bytes of the body the app pulled)."""
    pulled = 0
    index = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled, index
        if index < len(chunks):
            chunk = chunks[index]
            index += 1
            pulled += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": index < len(chunks)}
        await asyncio.Event().wait()   # the client stays connected until the response is done

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "server": ("test", 80), "client": ("test", 1234)}
    await asyncio.wait_for(app(scope, receive, send), timeout=20)
    return sent, pulled


def response_of(sent: list[dict]) -> tuple[int, dict]:
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


async def test_chunked_upload_without_length_is_cut_off_at_the_limit():
    stack = Stack(max_voice_upload_bytes=100_000)
    limit = 100_000 + MULTIPART_OVERHEAD_BYTES
    piece = 16 * 1024
    head = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n")
    chunks = [head] + [b"\0" * piece] * 200                      # 3.2 MB offered, never declared
    sent, pulled = await drive(stack.app, "/v1/voices", chunks,
                               {"content-type": "multipart/form-data; boundary=b"})
    status, body = response_of(sent)
    assert status == 413 and body["error"]["code"] == "file_too_large" and body["error"]["param"] == "file"
    assert limit < pulled <= limit + piece                       # stopped at the limit, not spooled whole


async def test_chunked_json_body_is_cut_off_at_the_limit():
    stack = Stack()
    piece = 64 * 1024
    chunks = [b'{"input": "'] + [b"a" * piece] * 64               # 4 MiB offered
    sent, pulled = await drive(stack.app, "/v1/audio/speech", chunks, {"content-type": "application/json"})
    status, body = response_of(sent)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert pulled <= MAX_JSON_BODY_BYTES + piece
    assert not stack.t3.jobs


async def test_declared_length_over_the_limit_reads_nothing():
    stack = Stack(max_voice_upload_bytes=100_000)
    sent, pulled = await drive(stack.app, "/v1/voices", [b"x" * 1000],
                               {"content-type": "multipart/form-data; boundary=b", "content-length": "5000000"})
    status, body = response_of(sent)
    assert status == 413 and body["error"]["code"] == "file_too_large" and pulled == 0


async def test_bodies_under_the_limit_pass_in_any_number_of_pieces():
    stack = Stack()
    payload = json.dumps({"input": "Hello in pieces.", "response_format": "pcm", "stream": False}).encode()
    chunks = [payload[i:i + 5] for i in range(0, len(payload), 5)]
    sent, _ = await drive(stack.app, "/v1/audio/speech", chunks, {"content-type": "application/json"})
    assert next(m["status"] for m in sent if m["type"] == "http.response.start") == 200


async def test_an_anonymous_upload_is_refused_before_its_body_is_read():
    stack = Stack(api_keys=KEYS)
    sent, pulled = await drive(stack.app, "/v1/voices", [b"x" * 1000] * 10,
                               {"content-type": "multipart/form-data; boundary=b"})
    status, body = response_of(sent)
    assert status == 401 and pulled == 0
