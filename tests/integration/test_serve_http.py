"""The real thing over HTTP: Ray Serve on CPU with tiny random weights, driven by the openai SDK and httpx.

Random weights never emit the stop token, so every text chunk runs to `max_new_tokens` sampled tokens; the
control tokens among them (>= 6561) are dropped, so the speech-token count N is learnt from an SSE request's
`usage.output_tokens` and, with the same seed, every format must decode to exactly N * 960 samples at 24 kHz
(lossy codecs within their frame padding).
"""
from __future__ import annotations

import base64
import io
import json
import time
import wave
from collections import defaultdict

import av
import httpx
import numpy as np
import openai
import pytest
from serve_fixture import API_KEY, MAX_NEW_TOKENS, MAX_VOICE_UPLOAD_BYTES, reference_wav

pytestmark = pytest.mark.timeout(900)

SAMPLE_RATE = 24_000
SAMPLES_PER_TOKEN = 960
TEXT = "Hello from the integration test."
SEED = 1234
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
TOLERANCE_S = {"mp3": 0.1, "aac": 0.1, "opus": 0.03, "flac": 0.0, "wav": 0.0, "pcm": 0.0}
DECODED_RATE = defaultdict(lambda: SAMPLE_RATE, opus=48_000)   # libopus always decodes at 48 kHz


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0, SAMPLE_RATE
    if fmt == "wav":
        with wave.open(io.BytesIO(data)) as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2
            return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767.0, w.getframerate()
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        rate = stream.codec_context.sample_rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        parts = [o.to_ndarray().reshape(-1) for f in c.decode(stream) for o in resampler.resample(f)]
        parts += [o.to_ndarray().reshape(-1) for o in resampler.resample(None)]
        return np.concatenate(parts), rate


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def app(serve_app_instance):
    return serve_app_instance


@pytest.fixture(scope="module")
def http(app):
    with app.client() as client:
        yield client


@pytest.fixture(scope="module")
def oai(app):
    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=API_KEY, timeout=180, max_retries=0)


@pytest.fixture(scope="module")
def reference(http) -> tuple[int, np.ndarray]:
    """(speech tokens N, pcm samples) of TEXT with SEED, from an SSE stream of raw pcm."""
    r = http.post("/v1/audio/speech", json={"input": TEXT, "seed": SEED, "response_format": "pcm",
                                            "stream_format": "sse"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1]["type"] == "speech.audio.done", events[-1]
    assert all(e["type"] == "speech.audio.delta" for e in events[:-1])
    num_tokens = events[-1]["usage"]["output_tokens"]
    assert 0 < num_tokens <= MAX_NEW_TOKENS
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    samples, _ = decode(pcm, "pcm")
    return num_tokens, samples


def test_health_models_and_memory(http):
    assert http.get("/healthz").json()["status"] == "ok"
    assert http.get("/readyz").json()["status"] == "ready"
    card = http.get("/v1/models").json()["data"][0]
    assert card["random_weights"] is True
    memory = http.get("/v1/memory").json()["stages"]
    assert set(memory) == {"t3", "s3gen", "voice"}
    for report in memory.values():
        assert report["device"] == "cpu" and report["dtype"] == "float32" and "allocated_bytes" in report


def test_sse_stream_length(reference):
    num_tokens, samples = reference
    assert samples.size == num_tokens * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("fmt", FORMATS)
def test_openai_sdk_every_format(oai, reference, fmt):
    num_tokens, _ = reference
    response = oai.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format=fmt,
                                       extra_body={"seed": SEED})
    samples, rate = decode(response.content, fmt)
    assert rate == DECODED_RATE[fmt]
    expected_s = num_tokens * SAMPLES_PER_TOKEN / SAMPLE_RATE
    assert abs(samples.size / rate - expected_s) <= TOLERANCE_S[fmt] + 1e-9, (fmt, samples.size / rate, expected_s)
    if fmt in ("wav", "pcm", "flac"):
        assert samples.size == num_tokens * SAMPLES_PER_TOKEN


def test_openai_sdk_streaming_response(oai, reference):
    """An unmodified SDK client streams: no `stream` field, the body arrives in pieces as it is made."""
    num_tokens, _ = reference
    with oai.audio.speech.with_streaming_response.create(model="tts-1", voice="default", input=TEXT,
                                                         response_format="pcm", extra_body={"seed": SEED}) as response:
        assert "content-length" not in response.headers
        pieces = list(response.iter_bytes())
    samples, _ = decode(b"".join(pieces), "pcm")
    assert samples.size == num_tokens * SAMPLES_PER_TOKEN


def test_first_bytes_arrive_long_before_the_end(oai):
    """The issue's case: an SDK client used to get its first byte only when the whole request was done."""
    # 12 sentences: the first byte (~1.3 s on 2 CPU cores) stays well under half of the whole (~6 s) on a busy box
    text = " ".join(f"Sentence number {i} of a passage long enough to take a while." for i in range(12))
    t0 = time.monotonic()
    with oai.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text,
                                                         response_format="mp3") as response:
        pieces = response.iter_bytes()
        first = next(pieces)
        first_s = time.monotonic() - t0
        rest = b"".join(pieces)
    total_s = time.monotonic() - t0
    assert first and rest
    print(f"first byte {first_s:.2f}s of {total_s:.2f}s")
    assert first_s < 0.5 * total_s, (first_s, total_s)


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_by_default_and_whole_with_stream_false(http, reference, fmt):
    num_tokens, _ = reference
    with http.stream("POST", "/v1/audio/speech", json={"input": TEXT, "seed": SEED, "response_format": fmt}) as r:
        assert r.status_code == 200 and "content-length" not in r.headers
        assert r.headers.get("transfer-encoding") == "chunked"
        streamed = b"".join(r.iter_bytes())
    whole = http.post("/v1/audio/speech", json={"input": TEXT, "seed": SEED, "response_format": fmt,
                                                "stream": False})
    assert whole.status_code == 200 and int(whole.headers["content-length"]) == len(whole.content)
    expected_s = num_tokens * SAMPLES_PER_TOKEN / SAMPLE_RATE
    for data in (streamed, whole.content):
        if fmt == "wav" and data is streamed:   # streamed wav declares an unknown size: read past the header
            assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff"
            samples, rate = np.frombuffer(data[44:], "<i2"), SAMPLE_RATE
        else:
            samples, rate = decode(data, fmt)
        assert abs(samples.size / rate - expected_s) <= TOLERANCE_S[fmt] + 1e-9, (fmt, samples.size / rate)


def test_voices_enroll_list_use_delete(http, oai):
    r = http.post("/v1/voices", files={"file": ("ref.wav", reference_wav(3.0, seed=3), "audio/wav")}, data={"name": "tester"})
    assert r.status_code == 200, r.text
    voice = r.json()
    assert voice["id"].startswith("voice_") and voice["name"] == "tester"
    assert abs(voice["duration_s"] - 3.0) < 0.01

    listed = http.get("/v1/voices").json()["data"]
    assert {"default", voice["id"]} <= {v["id"] for v in listed}

    speech = oai.audio.speech.create(model="chatterbox", voice=voice["id"], input="Use my voice.",
                                     response_format="wav", extra_body={"seed": 5})
    samples, rate = decode(speech.content, "wav")
    assert rate == SAMPLE_RATE and 0 < samples.size <= MAX_NEW_TOKENS * SAMPLES_PER_TOKEN
    assert samples.size % SAMPLES_PER_TOKEN == 0

    assert http.delete(f"/v1/voices/{voice['id']}").json() == {"id": voice["id"], "object": "voice.deleted",
                                                               "deleted": True}
    assert voice["id"] not in {v["id"] for v in http.get("/v1/voices").json()["data"]}
    r = http.post("/v1/audio/speech", json={"input": "Gone.", "voice": voice["id"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found"
    assert http.delete(f"/v1/voices/{voice['id']}").status_code == 404
    assert http.delete("/v1/voices/default").status_code == 400


@pytest.mark.parametrize("body,status,param", [
    ({"input": "   "}, 400, "input"),
    ({"input": "x" * 1001}, 400, "input"),
    ({"input": "hi", "voice": "nobody"}, 404, "voice"),
    ({"input": "hi", "model": "not-a-model"}, 404, "model"),
    ({"input": "hi", "speed": 10}, 422, "speed"),
    ({"input": "hi", "response_format": "ogg"}, 422, "response_format"),
    ({}, 422, "input"),
])
def test_speech_errors(http, body, status, param):
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


def test_voice_upload_errors(http):
    too_big = reference_wav(MAX_VOICE_UPLOAD_BYTES / 48_000 + 2.0, seed=3)
    r = http.post("/v1/voices", files={"file": ("big.wav", too_big, "audio/wav")})
    assert r.status_code == 413, r.text
    r = http.post("/v1/voices", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415, r.text
    r = http.post("/v1/voices", files={"file": ("junk.wav", b"RIFF not really audio", "audio/wav")})
    assert r.status_code == 415, r.text


@pytest.mark.parametrize("body", [{"input": "hi"}, {"input": "hi", "stream": False},
                                  {"input": "hi", "stream_format": "sse"}])
def test_auth(app, body):
    with httpx.Client(base_url=app.base_url, timeout=30) as anonymous:
        r = anonymous.post("/v1/audio/speech", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.json()["error"]["code"] == "missing_api_key"
        r = anonymous.post("/v1/audio/speech", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for path in ("/v1/models", "/v1/voices", "/v1/config", "/v1/memory", "/openapi.json", "/docs"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.get("/healthz").status_code == 200   # probes need no key
        assert anonymous.get("/readyz").status_code == 200
    bad = openai.OpenAI(base_url=f"{app.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.audio.speech.create(model="tts-1", voice="alloy", input="hi")
    with pytest.raises(openai.AuthenticationError):
        with bad.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="hi"):
            pass


def test_keys_appear_in_no_log_and_not_in_config(app, http):
    config = http.get("/v1/config").json()
    assert config["auth_enabled"] is True and API_KEY not in json.dumps(config)
    logs = app.root / "ray" / "session_latest" / "logs"
    assert logs.is_dir()
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not leaked, f"the API key is written in {leaked}"
