"""POST /v1/audio/speech over fake stages: formats, streaming, SSE, speed, pipelining, cancellation, errors."""
from __future__ import annotations

import asyncio
import dataclasses
import base64
import json

import httpx
import numpy as np
import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from router_fakes import SAMPLE_RATES, TOLERANCE_S, FakeS3Gen, FakeT3, Stack, decode_any, tokens_for

from serve_app.contracts import BUILTIN_VOICE, SAMPLES_PER_TOKEN

pytestmark = pytest.mark.anyio
ALL_FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]
TEXT = "Hello there. This is a test of the speech router, with two sentences!"
LONG_TEXT = " ".join(f"Sentence number {i} is here to make the input long enough." for i in range(12))


@pytest.fixture
def anyio_backend():
    return "asyncio"


def client(stack: Stack, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app), base_url="http://test", **kwargs)


async def speech(stack: Stack, **body) -> httpx.Response:
    body.setdefault("model", "chatterbox")
    async with client(stack) as c:
        return await c.post("/v1/audio/speech", json=body)


def assert_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
async def test_every_format_decodes_to_the_vocoded_length(fmt, stream):
    stack = Stack(max_chunk_chars=40)  # TEXT becomes two chunks: one crossfade
    response = await speech(stack, input=TEXT, response_format=fmt, stream=stream)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith({"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
                                                        "flac": "audio/flac", "wav": "audio/wav",
                                                        "pcm": "audio/pcm"}[fmt])
    samples, sr = decode_any(response.content, fmt)
    assert sr == SAMPLE_RATES[fmt]
    expected_s = stack.expected_samples(TEXT) / 24_000
    assert len(stack.t3.jobs) >= 2  # several chunks, crossfaded
    assert abs(samples.size / sr - expected_s) <= TOLERANCE_S[fmt] + 1e-9, (samples.size / sr, expected_s)


@pytest.mark.parametrize("stream", [False, True])
async def test_one_container_per_response(stream, monkeypatch):
    """The media type comes from a table: no PyAV container is opened (and left open) just to read it."""
    import av

    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])
    response = await speech(Stack(), input="Hello there.", response_format="mp3", stream=stream)
    assert response.status_code == 200 and response.headers["content-type"].startswith("audio/mpeg")
    assert len(opened) == 1


async def test_pcm_is_exact_and_the_tone_survives():
    stack = Stack()
    response = await speech(stack, input=TEXT, response_format="pcm", stream=False)
    assert len(response.content) == 2 * tokens_for(stack.t3.jobs[0].text) * SAMPLES_PER_TOKEN
    samples, _ = decode_any(response.content, "pcm")
    assert np.abs(samples).max() == pytest.approx(0.3, abs=0.01)
    assert "content-length" in response.headers and "x-request-id" in response.headers


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("speed", [0.5, 2.0])
async def test_speed_scales_duration(speed, stream):
    stack = Stack()
    normal = decode_any((await speech(stack, input=TEXT, response_format="wav", stream=stream)).content, "wav")[0]
    changed = decode_any((await speech(stack, input=TEXT, response_format="wav", speed=speed,
                                       stream=stream)).content, "wav")[0]
    assert changed.size / normal.size == pytest.approx(1 / speed, rel=0.03)


async def test_sse_events_carry_the_audio_then_usage():
    stack = Stack(max_chunk_chars=40)
    response = await speech(stack, input=TEXT, response_format="pcm", stream_format="sse")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert len(events) > 2  # audio arrived in several deltas
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(audio) == 2 * stack.expected_samples(TEXT)
    done = events[-1]
    total_tokens = sum(tokens_for(j.text) for j in stack.t3.jobs)
    assert done == {"type": "speech.audio.done", "usage": {"input_tokens": len(TEXT), "output_tokens": total_tokens,
                                                           "total_tokens": len(TEXT) + total_tokens}}


async def test_streaming_vocodes_growing_prefixes_in_steps():
    stack = Stack(t3=FakeT3(step_delay_s=0.01), first_chunk_tokens=10, stream_chunk_tokens=20)
    await speech(stack, input=TEXT, response_format="pcm", stream=True)
    items = [it for it in stack.s3gen.items if it.request_id.endswith("-0")]
    assert len(items) >= 3
    assert not items[0].finalize and items[0].state == {"num_samples": 0} and len(items[0].tokens) >= 10 + 3
    for prev, item in zip(items, items[1:]):
        assert item.tokens[:len(prev.tokens)] == prev.tokens  # the stream's tokens so far, growing
        assert item.state is not None
    assert items[-1].finalize and len(items[-1].tokens) == tokens_for(stack.t3.jobs[0].text)
    # T3 sent its tokens in blocks (first_chunk_tokens + 3 look-ahead, then >= t3_block_tokens), not per token
    assert stack.t3.jobs[0].first_block_tokens == 13 and stack.t3.jobs[0].block_tokens == 16


async def test_one_shot_vocodes_each_chunk_once():
    stack = Stack(max_chunk_chars=40)
    await speech(stack, input=TEXT, response_format="wav", stream=False)
    items = stack.s3gen.items
    assert len(items) == len(stack.t3.jobs) >= 2 and all(it.finalize and it.state is None for it in items)


async def test_streams_of_concurrent_requests_share_vocoder_steps():
    stack = Stack(t3=FakeT3(step_delay_s=0.002), s3gen=FakeS3Gen(delay_s=0.03), first_chunk_tokens=5,
                  stream_chunk_tokens=5)
    await asyncio.gather(*(speech(stack, input=TEXT, response_format="pcm", stream=True) for _ in range(6)))
    assert max(len({it.request_id for it in step}) for step in stack.s3gen.backend.steps) >= 3


async def test_t3_of_the_next_chunk_runs_while_this_chunk_is_vocoded():
    stack = Stack(t3=FakeT3(step_delay_s=0.001), s3gen=FakeS3Gen(delay_s=0.05), max_chunk_chars=80)
    await speech(stack, input=LONG_TEXT, response_format="pcm")
    t3_start = {rid: t for what, rid, t in stack.t3.events if what == "t3_start"}
    vocode_end = {rid: t for what, rid, t in stack.s3gen.events if what == "vocode_end"}
    ids = sorted(t3_start, key=t3_start.get)
    assert len(ids) >= 4
    # chunk k+1 is in flight (T3 started, not yet vocoded) while chunk k is: the pipeline runs ahead
    for this, nxt in zip(ids, ids[1:]):
        assert t3_start[nxt] < vocode_end[nxt] and t3_start[nxt] <= vocode_end[this] + 0.2
    assert t3_start[ids[1]] < vocode_end[ids[0]]
    # and never more than lookahead_chunks=1 ahead: chunk k+2 starts only after chunk k's vocode began
    vocode_start = {rid: t for what, rid, t in stack.s3gen.events if what == "vocode_start"}
    for k in range(len(ids) - 2):
        assert t3_start[ids[k + 2]] >= vocode_start[ids[k]]


async def test_text_reaches_t3_normalised_with_params():
    stack = Stack()
    await speech(stack, input="hello there... friend", voice="alloy", seed=7, exaggeration=0.9, cfg_weight=0.2,
                 temperature=0.5, response_format="wav")
    job = stack.t3.jobs[0]  # upstream punc_norm leaves two spaces where "..." was
    assert job.text == "Hello there,  friend." and job.voice_id == BUILTIN_VOICE
    assert (job.params.seed, job.params.exaggeration, job.params.cfg_weight, job.params.temperature) == (
        7, 0.9, 0.2, 0.5)
    assert stack.s3gen.items[0].seed == 7


async def test_chinese_reaches_t3_in_whole_sentences():
    stack = Stack(multilingual=True, max_chunk_chars=20)
    text = "我们去公园散步吧！今天天气很好。你想去吗？" * 3
    assert (await speech(stack, input=text, language="zh", response_format="pcm")).status_code == 200
    texts = [job.text for job in stack.t3.jobs]
    assert len(texts) > 2 and "".join(texts) == text and all(t.endswith(("！", "。", "？")) for t in texts)


async def test_enrolled_voice_wins_over_openai_name():
    stack = Stack()
    from serve_app.contracts import VoiceInfo

    stack.voices.voices["alloy"] = VoiceInfo("alloy", "my alloy", 0, 5.0)
    await speech(stack, input="hi", voice={"id": "alloy"}, response_format="pcm")
    assert stack.t3.jobs[0].voice_id == "alloy"


async def test_watermarker_is_applied():
    marks = []

    def watermark(audio):
        marks.append(audio.size)
        return audio * 0.5

    stack = Stack(watermarker=watermark)
    data = (await speech(stack, input=TEXT, response_format="pcm")).content
    assert marks and np.abs(decode_any(data, "pcm")[0]).max() == pytest.approx(0.15, abs=0.01)
    marks.clear()
    data = (await speech(stack, input=TEXT, response_format="pcm", stream=True)).content
    assert min(marks) >= 12_000  # blocks of >= 0.5 s
    assert np.abs(decode_any(data, "pcm")[0]).max() == pytest.approx(0.15, abs=0.01)


async def test_random_weights_header_and_metrics():
    stack = Stack(is_random_weights=True, checkpoint_source="random:tiny")
    response = await speech(stack, input=TEXT, response_format="wav", stream=True)
    assert response.headers["x-chatterbox-random-weights"] == "true"
    assert len(stack.metrics.values("time_to_first_audio_seconds")) == 1
    assert stack.metrics.values("requests_total") == [(1, {"route": "speech", "status": "200"})]
    (duration, tags), = stack.metrics.values("request_duration_seconds")
    assert tags == {"route": "speech", "stream": "true", "status": "200"}
    audio_s = sum(v for v, _ in stack.metrics.values("audio_seconds_total"))
    assert audio_s == pytest.approx(stack.expected_samples(TEXT) / 24_000, rel=1e-3)


# -- streaming by default ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ALL_FORMATS)
async def test_speech_streams_by_default_and_stream_false_sends_a_whole_file(fmt):
    stack = Stack(t3=FakeT3(step_delay_s=0.01), first_chunk_tokens=5, stream_chunk_tokens=10)
    sent = await run_asgi_until(stack.app, {"input": TEXT, "response_format": fmt}, None, None)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 200 and b"content-length" not in dict(start["headers"])
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert sum(1 for m in bodies if m.get("body")) >= 2 and bodies[-1].get("more_body", False) is False
    whole = await speech(stack, input=TEXT, response_format=fmt, stream=False)
    assert whole.status_code == 200 and int(whole.headers["content-length"]) == len(whole.content) > 0


async def test_first_bytes_leave_before_the_audio_is_finished():
    stack = Stack(t3=FakeT3(step_delay_s=0.02), first_chunk_tokens=5, stream_chunk_tokens=10, max_chunk_chars=80)
    times: list[float] = []

    async def send_hook(message):
        if message["type"] == "http.response.body" and message.get("body"):
            times.append(asyncio.get_running_loop().time())

    await run_asgi_until(stack.app, {"input": LONG_TEXT, "response_format": "pcm"}, None, None, on_send=send_hook)
    assert len(times) > 5 and times[-1] - times[0] > 0.5   # bytes kept arriving while T3 was still speaking


async def test_streamed_wav_declares_an_unknown_length():
    data = (await speech(Stack(), input=TEXT, response_format="wav")).content
    assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff" and data[40:44] == b"\xff\xff\xff\xff"


async def test_audio_stream_failing_after_its_first_bytes_is_cut_off():
    """The status line is sent: the stream ends without its final chunk, so a client sees an incomplete body,
    not a short file that looks complete; the SSE form of the same failure ends with an error event."""
    from serve_app.serving.api.app import StreamInterrupted

    stack = Stack(t3=FakeT3(fail_on_chunk=1), max_chunk_chars=40, lookahead_chunks=0)
    sent: list[dict] = []
    with pytest.raises(StreamInterrupted):
        await run_asgi_until(stack.app, {"input": TEXT, "response_format": "pcm"}, None, None, sent=sent)
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 200
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert bodies and all(m.get("more_body") for m in bodies)            # no final (more_body=False) message
    assert stack.metrics.values("requests_total")[-1][1] == {"route": "speech", "status": "500"}


# -- errors -----------------------------------------------------------------------------------------------------------

async def test_validation_errors_are_422_in_the_one_shape():
    stack = Stack()
    assert_error(await speech(stack, input="hi", speed=5), 422, param="speed", code="validation_error")
    assert_error(await speech(stack, input="hi", response_format="ogg"), 422, param="response_format")
    async with client(stack) as c:
        err = assert_error(await c.post("/v1/audio/speech", content=b"{not json",
                                        headers={"content-type": "application/json"}), 422)
        assert err["type"] == "invalid_request_error"


async def test_input_limits_are_400():
    stack = Stack(max_input_chars=50)
    assert_error(await speech(stack, input="x" * 51), 400, param="input", code="input_too_long")
    assert_error(await speech(stack, input="   \n "), 400, param="input", code="empty_input")
    assert_error(await speech(stack, input="\x00\x00\x00"), 400, param="input", code="empty_input")
    assert_error(await speech(stack, input="\u200b\x1b \x7f"), 400, param="input", code="empty_input")
    assert_error(await speech(stack, input="hola", language="es"), 400, param="language")


async def test_unknown_voice_and_model_are_404():
    stack = Stack()
    err = assert_error(await speech(stack, input="hi", voice="nobody"), 404, param="voice", code="voice_not_found")
    assert err["type"] == "not_found_error"
    assert_error(await speech(stack, input="hi", model="gpt-5"), 404, param="model", code="model_not_found")
    assert (await speech(stack, input="hi", model="tts-1", response_format="pcm")).status_code == 200


async def test_unknown_route_is_404_in_the_one_shape():
    async with client(Stack()) as c:
        assert_error(await c.get("/v1/nothing"), 404)
        assert_error(await c.get("/v1/audio/speech"), 405)


@pytest.mark.parametrize("stream", [False, True])
async def test_backpressure_is_429_with_retry_after(stream):
    stack = Stack(t3=FakeT3(raise_on_start=BackPressureError(num_queued_requests=5, max_queued_requests=5)))
    response = await speech(stack, input=TEXT, stream=stream)
    assert_error(response, 429, code="backpressure")
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
async def test_unavailable_stage_is_503(stream_format):
    exc = DeploymentUnavailableError(DeploymentID(name="S3GenStage", app_name="chatterbox"))
    stack = Stack(s3gen=FakeS3Gen(raise_exc=exc))
    response = await speech(stack, input=TEXT, stream_format=stream_format)
    assert_error(response, 503, code="stage_unavailable")
    assert "retry-after" in response.headers
    assert stack.metrics.values("requests_total") == [(1, {"route": "speech", "status": "503"})]


class S3GenLosingReplicas(FakeS3Gen):
    """Its first `num_lost` calls fail as a call to a replica that died does (RayTaskError around ActorDiedError
    when the stage saw T3 die, ActorDiedError when it died itself)."""

    def __init__(self, num_lost: int, wrapped: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_lost, self.wrapped = num_lost, wrapped

    async def synthesize(self, job):
        from ray.exceptions import ActorDiedError, RayTaskError

        if self.num_lost > 0:
            self.num_lost -= 1
            self.jobs.append(job)
            died = ActorDiedError()
            raise RayTaskError("synthesize", "traceback", died).as_instanceof_cause() if self.wrapped else died
        async for block in super().synthesize(job):
            yield block


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("body", [{}, {"stream": False}, {"stream_format": "sse"}])
async def test_a_replica_lost_before_any_audio_is_retried_once(body, wrapped):
    stack = Stack(s3gen=S3GenLosingReplicas(1, wrapped=wrapped))
    response = await speech(stack, input=TEXT, response_format="pcm", **body)
    assert response.status_code == 200 and len(response.content) > 0
    lost_twice = Stack(s3gen=S3GenLosingReplicas(2, wrapped=wrapped))
    err = assert_error(await speech(lost_twice, input=TEXT, response_format="pcm", **body), 503,
                       code="stage_unavailable")
    assert "retry" in err["message"] and "pid" not in err["message"]       # Ray's details stay in the log
    no_retries = Stack(s3gen=S3GenLosingReplicas(1, wrapped=wrapped), max_stage_retries=0)
    assert_error(await speech(no_retries, input=TEXT, response_format="pcm", **body), 503)


@pytest.mark.parametrize("body", [{}, {"stream": False}, {"stream_format": "sse"}])
async def test_a_stalled_stage_ends_the_request_instead_of_holding_the_client(body):
    stack = Stack(t3=FakeT3(step_delay_s=3.0), max_stall_s=0.3)
    t0 = asyncio.get_running_loop().time()
    response = await speech(stack, input=TEXT, response_format="pcm", **body)
    assert asyncio.get_running_loop().time() - t0 < 2.0
    assert_error(response, 503, code="stage_stalled")
    await asyncio.sleep(0.05)
    assert stack.t3.cancelled and not stack.t3.completed                  # the stalled work was cancelled


async def test_other_stage_errors_are_not_retried():
    stack = Stack(t3=FakeT3(raise_on_start=BackPressureError(num_queued_requests=5, max_queued_requests=5)))
    assert_error(await speech(stack, input=TEXT), 429)
    assert len(stack.t3.jobs) == 1


async def test_sse_stream_ends_with_an_error_event_after_audio():
    stack = Stack(t3=FakeT3(fail_on_chunk=1), max_chunk_chars=40, lookahead_chunks=0)
    response = await speech(stack, input=TEXT, response_format="pcm", stream_format="sse")
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error"
    assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
    assert events[-1]["error"]["code"] == "t3_error"


async def test_api_keys():
    stack = Stack(api_keys=["secret-1", "secret-2"])
    assert_error(await speech(stack, input="hi"), 401, code="missing_api_key")
    async with client(stack, headers={"Authorization": "Bearer wrong"}) as c:
        err = assert_error(await c.post("/v1/audio/speech", json={"input": "hi"}), 401, code="invalid_api_key")
        assert err["type"] == "authentication_error"
        assert (await c.get("/healthz")).status_code == 200  # probes need no key
    async with client(stack, headers={"Authorization": "Bearer secret-2"}) as c:
        assert (await c.post("/v1/audio/speech", json={"input": "hi", "response_format": "pcm"})).status_code == 200
        assert (await c.get("/v1/models")).status_code == 200


# -- cancellation -----------------------------------------------------------------------------------------------------

async def run_asgi_until(app, body: dict, disconnect_after_body_chunks: int | None, disconnect_after_s: float | None,
                         on_send=None, sent: list[dict] | None = None):
    """Drives the ASGI app by hand so the client can disconnect mid-request (None, None: stays connected).
    Returns the messages the app sent (also collected in `sent`, if given, when the app raises)."""
    payload = json.dumps(body).encode()
    sent = [] if sent is None else sent
    disconnect = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        if disconnect_after_s is not None:
            await asyncio.sleep(disconnect_after_s)
            return {"type": "http.disconnect"}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if on_send is not None:
            await on_send(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if disconnect_after_body_chunks is not None and len(chunks) >= disconnect_after_body_chunks:
            disconnect.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/audio/speech", "raw_path": b"/v1/audio/speech",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                              (b"content-length", str(len(payload)).encode())],
             "server": ("test", 80), "client": ("test", 1234)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


async def test_disconnect_cancels_a_one_shot_request():
    stack = Stack(t3=FakeT3(step_delay_s=0.05))
    sent = await run_asgi_until(stack.app, {"input": LONG_TEXT, "response_format": "wav"}, None, 0.2)
    await asyncio.sleep(0.05)
    assert stack.t3.cancelled, "T3 streams were not cancelled"
    assert not stack.t3.completed
    assert sent[0]["status"] == 499


async def test_disconnect_cancels_a_stream():
    stack = Stack(t3=FakeT3(step_delay_s=0.02), first_chunk_tokens=5, stream_chunk_tokens=5, max_chunk_chars=80)
    await run_asgi_until(stack.app, {"input": LONG_TEXT, "response_format": "pcm", "stream": True}, 2, None)
    await asyncio.sleep(0.05)
    assert stack.t3.cancelled, "T3 streams were not cancelled"
    assert len(stack.t3.jobs) < 12  # stopped early: not every chunk of LONG_TEXT was started
    assert stack.metrics.values("requests_total")[-1][1]["status"] == "499"


async def test_closing_the_pipeline_cancels_running_t3_streams():
    stack = Stack(t3=FakeT3(step_delay_s=0.01), max_chunk_chars=80)
    from serve_app.contracts import SynthesisParams

    long = " and it goes on long enough that T3 is still speaking it when the first audio arrives."
    gen = stack.router.pipeline.run("req-x", ["A first chunk of text here" + long, "A second chunk" + long],
                                    BUILTIN_VOICE, SynthesisParams(), streaming=True)
    await gen.__anext__()
    await gen.aclose()
    cancelled = sorted(stack.t3.cancelled)
    assert len(cancelled) == 2 and cancelled[0].startswith("req-x.") and [c[-2:] for c in cancelled] == ["-0", "-1"]


# -- the real OpenAI SDK ----------------------------------------------------------------------------------------------

async def test_openai_sdk_speech():
    openai = pytest.importorskip("openai")
    stack = Stack(api_keys=["sk-test"], max_chunk_chars=40)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app)) as http_client:
        sdk = openai.AsyncOpenAI(api_key="sk-test", base_url="http://test/v1", http_client=http_client)
        response = await sdk.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="wav",
                                                 speed=1.0, extra_body={"exaggeration": 0.7, "seed": 3})
        samples, sr = decode_any(response.content, "wav")
        assert sr == 24_000 and samples.size == stack.expected_samples(TEXT)
        assert stack.t3.jobs[0].params.exaggeration == 0.7
        async with sdk.audio.speech.with_streaming_response.create(
                model="chatterbox", voice="default", input=TEXT, response_format="pcm",
                extra_body={"stream": True}) as streamed:
            data = b"".join([chunk async for chunk in streamed.iter_bytes()])
        assert len(data) == 2 * stack.expected_samples(TEXT)
        with pytest.raises(openai.NotFoundError) as info:
            await sdk.audio.speech.create(model="tts-1", voice="nobody", input="hi")
        assert info.value.body["code"] == "voice_not_found" if isinstance(info.value.body, dict) else True
        models = await sdk.models.list()
        assert [m.id for m in models.data] == ["chatterbox"]


async def test_short_stream_tails_are_watermarked_with_context():
    seen = []

    def perth_like(audio):  # Perth's STFT needs a minimum length
        if audio.size < 2048:
            raise RuntimeError("Padding size should be less than the corresponding input dimension")
        seen.append(audio.size)
        return audio * 0.5

    # one block, then the crossfade hold-back (480 samples) as a tail too short on its own
    stack = Stack(watermarker=perth_like, first_chunk_tokens=25)
    text = "abcdefghijklmnopqrstuvwxy"  # punc_norm adds '.', capitalises: 26 tokens
    data = (await speech(stack, input=text, response_format="pcm", stream=True)).content
    samples = decode_any(data, "pcm")[0]
    assert samples.size == 26 * SAMPLES_PER_TOKEN
    assert np.abs(samples[-480:]).max() == pytest.approx(0.15, abs=0.01)  # the tail was marked too
    assert seen[-1] == 12_000 + 480  # with 0.5 s of context


async def test_short_text_gets_a_length_based_token_cap():
    """Each chunk may speak 2 s + 0.25 s per character at most (random weights never stop); 0 turns it off."""
    stack = Stack(max_new_tokens=1000, max_chunk_chars=40)
    text = "Hi. " + "This sentence is quite a bit longer than the first one."
    await speech(stack, input=text, response_format="wav")
    caps = [j.params.max_new_tokens for j in stack.t3.jobs]
    assert len(caps) >= 2
    assert caps == [int(np.ceil(25 * (2 + 0.25 * len(j.text)))) for j in stack.t3.jobs] and caps[0] < caps[1] < 1000
    off = Stack(max_new_tokens=1000, max_seconds_per_char=0)
    await speech(off, input="Hi.", response_format="wav")
    assert off.t3.jobs[0].params.max_new_tokens == 1000


async def test_speech_requests_past_the_replica_cap_get_an_openai_429():
    """A request holds its slot until its last byte; the one past the cap is refused at once with an
    OpenAI-shaped 429 and Retry-After, other routes still answer, and the slot frees when the first ends."""
    stack = Stack(t3=FakeT3(step_delay_s=0.05), max_active_speech_requests=1)
    body = dict(model="chatterbox", input=TEXT, stream=True, response_format="pcm")
    async with client(stack) as c:
        first = asyncio.create_task(c.post("/v1/audio/speech", json=body))
        await asyncio.sleep(0.1)                                   # the first is generating now
        assert not first.done()
        refused = await c.post("/v1/audio/speech", json=body)
        err = assert_error(refused, 429, code="server_busy")
        assert "maximum of 1" in err["message"] and refused.headers["retry-after"] == "1"
        assert (await c.get("/v1/models")).status_code == 200
        assert not first.done()
        assert (await first).status_code == 200
        again = await c.post("/v1/audio/speech", json={**body, "stream": False})
        assert again.status_code == 200 and len(again.content) > 0


async def test_a_finished_stream_is_counted_stall_free_or_not():
    fast = Stack(first_chunk_tokens=5, stream_chunk_tokens=5)
    await speech(fast, input=TEXT, response_format="pcm", stream=True)
    assert fast.metrics.values("streams_total") == [(1, {"stall_free": "true"})]
    # 7 tokens (0.28 s of audio) a step, 0.4 s apart: every piece after the first comes late
    slow = Stack(t3=FakeT3(step_delay_s=0.4), first_chunk_tokens=5, stream_chunk_tokens=5)
    await speech(slow, input="A short one, long enough for three steps.", response_format="pcm", stream=True)
    assert slow.metrics.values("streams_total") == [(1, {"stall_free": "false"})]


class BusyOnceS3Gen(FakeS3Gen):
    """Turns away the first call for each text chunk listed in `busy` (a full queue), then serves it."""

    def __init__(self, busy: dict[int, int]):
        super().__init__()
        self.busy = dict(busy)   # chunk index -> rejections left

    async def synthesize(self, job):
        index = int(job.request_id.rsplit("-", 1)[1])
        if self.busy.get(index, 0) > 0:
            self.busy[index] -= 1
            self.jobs.append(job)
            raise BackPressureError(num_queued_requests=8, max_queued_requests=8)
        async for block in super().synthesize(job):
            yield block


async def test_a_later_chunk_turned_away_by_a_full_queue_is_asked_again_not_cut():
    stack = Stack(s3gen=BusyOnceS3Gen({1: 2, 2: 1}), max_chunk_chars=40)
    stack.router.pipeline.config = dataclasses.replace(stack.router.pipeline.config, busy_backoff_s=0.001)
    r = await speech(stack, input=TEXT + " " + TEXT, response_format="pcm")
    assert r.status_code == 200
    samples, _ = decode_any(r.content, "pcm")
    assert samples.size == stack.expected_samples(TEXT + " " + TEXT)
    ids = [j.request_id for j in stack.s3gen.jobs]
    assert ids.count(ids[0][:-2] + "-1") == 3 and ids.count(ids[0][:-2] + "-2") == 2


async def test_the_first_chunk_turned_away_is_a_429_and_a_later_one_past_its_retries_cuts_the_stream():
    stack = Stack(s3gen=BusyOnceS3Gen({0: 1}), max_chunk_chars=40)
    assert_error(await speech(stack, input=TEXT, response_format="pcm"), 429, code="backpressure")
    stack = Stack(s3gen=BusyOnceS3Gen({1: 99}), max_chunk_chars=40)
    stack.router.pipeline.config = dataclasses.replace(stack.router.pipeline.config, busy_backoff_s=0.001,
                                                       busy_retries=3)
    from serve_app.serving.api.app import StreamInterrupted

    sent: list[dict] = []
    with pytest.raises(StreamInterrupted):   # audio had started: the body is cut, not completed
        await run_asgi_until(stack.app, {"input": TEXT + " " + TEXT, "response_format": "pcm"}, None, None, sent=sent)
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 200
    assert [j.request_id[-2:] for j in stack.s3gen.jobs].count("-1") == 4


async def test_time_to_first_audio_is_broken_down_by_phase():
    # T3 takes >= 0.03 s to its first token, the vocoder step >= 0.05 s: the phases must show it
    stack = Stack(t3=FakeT3(tokens_per_step=40, step_delay_s=0.03), s3gen=FakeS3Gen(delay_s=0.05),
                  first_chunk_tokens=10)
    await speech(stack, input=TEXT + " " + TEXT, response_format="pcm")
    (ttfa, _), = stack.metrics.values("time_to_first_audio_seconds")
    phases = {t["phase"]: v for v, t in stack.metrics.values("first_audio_phase_seconds")}
    assert set(phases) == {"conds", "t3_call", "t3_first_token", "t3_first_block", "vocode_wait", "vocode", "router"}
    assert all(v >= 0 for v in phases.values())
    assert phases["t3_first_token"] >= 0.03 and phases["vocode"] >= 0.05
    assert phases["t3_call"] < 0.03          # T3's own time is not counted twice
    assert sum(phases.values()) == pytest.approx(ttfa, abs=1e-6)
    # each phase's exact sum too (Ray's histogram _sum is rebuilt from bucket midpoints); a counter takes no 0
    totals = {t["phase"]: v for v, t in stack.metrics.values("first_audio_phase_seconds_total")}
    assert totals == pytest.approx({k: v for k, v in phases.items() if v > 0})
    # a whole file has no first-audio phases
    await speech(stack, input=TEXT, response_format="wav", stream=False)
    assert len(stack.metrics.values("first_audio_phase_seconds")) == 7


async def test_later_text_chunks_queue_behind_first_ones_in_t3():
    """first_chunks_first: a request's first text chunk has T3 priority 0, its later (look-ahead) ones 1; off,
    every chunk is 0 (arrival order)."""
    for on in (True, False):
        stack = Stack(max_chunk_chars=40, first_chunks_first=on)
        await speech(stack, input=TEXT, response_format="pcm")
        prio = {job.request_id: job.priority for job in stack.t3.jobs}
        assert len(prio) >= 2
        assert all(p == (1 if on and not rid.endswith("-0") else 0) for rid, p in prio.items()), prio


async def test_requests_that_share_an_x_request_id_never_share_a_stage_stream():
    """Two requests with one x-request-id (a client reusing it, or the proxy's retry of a request whose router
    replica died while the first run's streams were still open in S3Gen) both get their audio: each run's text
    chunks reach the stages under ids of their own, prefixed with the request id for the logs."""
    stack = Stack(t3=FakeT3(step_delay_s=0.01), max_chunk_chars=40)
    body = {"model": "chatterbox", "input": TEXT, "response_format": "pcm"}
    async with client(stack) as c:
        responses = await asyncio.gather(*(c.post("/v1/audio/speech", json=body, headers={"x-request-id": "same"})
                                           for _ in range(2)))
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert all(len(r.content) == 2 * stack.expected_samples(TEXT) for r in responses)
    ids = [job.request_id for job in stack.s3gen.jobs]
    assert len(ids) == len(set(ids)) and all(i.startswith("same.") for i in ids)
    assert len({i.rsplit("-", 1)[0] for i in ids}) == 2       # two runs, each with its chunks -0, -1, ...
