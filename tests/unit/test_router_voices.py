"""Voices, models, config, memory and probes over fake stages."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import soundfile as sf
from router_fakes import FakeVoices, Stack, tone
from test_router import assert_error, client

from serve_app.serving.audio import encode_audio

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def clip(seconds: float, fmt: str = "wav", sample_rate: int = 24_000) -> bytes:
    if fmt == "wav" and sample_rate != 24_000:
        buf = io.BytesIO()
        sf.write(buf, tone(int(seconds * sample_rate)), sample_rate, format="WAV", subtype="PCM_16")
        return buf.getvalue()
    return encode_audio(tone(int(seconds * 24_000)), fmt)


async def upload(stack: Stack, data: bytes, name: str | None = "Ann", content_type: str = "audio/wav",
                 **kwargs) -> httpx.Response:
    async with client(stack, **kwargs) as c:
        return await c.post("/v1/voices", files={"file": ("clip", data, content_type)},
                            data={"name": name} if name else None)


@pytest.mark.parametrize("fmt, content_type", [("wav", "audio/wav"), ("mp3", "audio/mpeg"),
                                               ("flac", "application/octet-stream")])
async def test_enroll_list_use_delete(fmt, content_type):
    stack = Stack()
    response = await upload(stack, clip(4.0, fmt), content_type=content_type)
    assert response.status_code == 200, response.text
    voice = response.json()
    assert voice["object"] == "voice" and voice["name"] == "Ann" and not voice["builtin"]
    assert voice["duration_s"] == pytest.approx(4.0, abs=0.1)
    # the stage gets mono PCM16 WAV whatever was uploaded
    samples, sr = sf.read(io.BytesIO(stack.voices.enrolled_audio[voice["id"]]), dtype="float32")
    assert sr == 24_000 and samples.ndim == 1 and samples.size / sr == pytest.approx(4.0, abs=0.1)

    async with client(stack) as c:
        listed = (await c.get("/v1/voices")).json()
        assert listed["object"] == "list"
        assert {v["id"] for v in listed["data"]} == {"default", voice["id"]}
        speech = await c.post("/v1/audio/speech", json={"input": "hi", "voice": voice["id"],
                                                        "response_format": "pcm"})
        assert speech.status_code == 200 and stack.t3.jobs[-1].voice_id == voice["id"]
        deleted = await c.delete(f"/v1/voices/{voice['id']}")
        assert deleted.json() == {"id": voice["id"], "object": "voice.deleted", "deleted": True}
        assert_error(await c.delete(f"/v1/voices/{voice['id']}"), 404, code="voice_not_found")
        assert_error(await c.post("/v1/audio/speech", json={"input": "hi", "voice": voice["id"]}), 404,
                     param="voice")


async def test_enroll_keeps_the_upload_sample_rate():
    stack = Stack()
    voice = (await upload(stack, clip(3.0, sample_rate=16_000))).json()
    _, sr = sf.read(io.BytesIO(stack.voices.enrolled_audio[voice["id"]]))
    assert sr == 16_000


async def test_upload_too_large_is_413():
    stack = Stack(max_voice_upload_bytes=100_000)
    assert_error(await upload(stack, clip(3.0)), 413, param="file", code="file_too_large")  # 144 KB of wav


async def test_upload_not_audio_is_415():
    stack = Stack()
    assert_error(await upload(stack, b"GIF89a" + bytes(5000), content_type="audio/wav"), 415, param="file",
                 code="unsupported_media")
    assert_error(await upload(stack, clip(3.0), content_type="text/plain"), 415, code="unsupported_media")


@pytest.mark.parametrize("seconds, code", [(1.0, "audio_too_short"), (31.0, "audio_too_long")])
async def test_upload_duration_limits_are_400(seconds, code):
    stack = Stack()
    assert_error(await upload(stack, clip(seconds)), 400, param="file", code=code)
    assert set(stack.voices.voices) == {"default"}


async def test_upload_without_file_is_422():
    async with client(Stack()) as c:
        assert_error(await c.post("/v1/voices", data={"name": "x"}), 422, param="file")


async def test_builtin_voice_cannot_be_deleted():
    async with client(Stack()) as c:
        assert_error(await c.delete("/v1/voices/default"), 400, code="builtin_voice")
        assert_error(await c.delete("/v1/voices/alloy"), 404)


async def test_models_report_random_weights_and_source():
    stack = Stack(is_random_weights=True, checkpoint_source="random:full")
    async with client(stack) as c:
        response = await c.get("/v1/models")
        assert response.headers["x-chatterbox-random-weights"] == "true"
        card, = response.json()["data"]
        assert card["id"] == "chatterbox" and card["random_weights"] is True and card["checkpoint"] == "random:full"
        assert card["object"] == "model" and response.json()["object"] == "list"
        assert (await c.get("/v1/models/chatterbox")).json()["id"] == "chatterbox"
        assert_error(await c.get("/v1/models/tts-2"), 404, code="model_not_found")
    async with client(Stack(checkpoint_source="hub:ResembleAI/chatterbox")) as c:
        response = await c.get("/v1/models")
        assert "x-chatterbox-random-weights" not in response.headers
        assert response.json()["data"][0]["random_weights"] is False


async def test_config_hides_secrets():
    async with client(Stack(api_keys=["sk-very-secret"]), headers={"Authorization": "Bearer sk-very-secret"}) as c:
        response = await c.get("/v1/config")
        assert response.status_code == 200
        assert "sk-very-secret" not in response.text and "api_keys" not in response.json()
        assert response.json()["auth_enabled"] is True and response.json()["max_input_chars"] == 4096


async def test_memory_and_readiness():
    voices = FakeVoices()
    stack = Stack(voices=voices)
    async with client(stack) as c:
        assert (await c.get("/healthz")).json() == {"status": "ok", "stages": {}}
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["stages"] == {"t3": "ok", "s3gen": "ok", "voice": "ok"}
        memory = (await c.get("/v1/memory")).json()
        assert memory["object"] == "memory_report" and memory["stages"]["t3"]["stage"] == "t3"
        voices.fail_memory = True
        not_ready = await c.get("/readyz")
        err = assert_error(not_ready, 503, code="not_ready")
        assert "voice" in err["message"] and not_ready.headers["retry-after"] == "5"
        memory = (await c.get("/v1/memory")).json()
        assert "voice replica is down" in memory["stages"]["voice"]["error"]
        assert memory["stages"]["s3gen"]["stage"] == "s3gen"


async def test_every_route_sets_a_request_id():
    async with client(Stack()) as c:
        echoed = await c.get("/v1/models", headers={"X-Request-Id": "abc-123"})
        assert echoed.headers["x-request-id"] == "abc-123"
        made = await c.post("/v1/audio/speech", json={"input": "hi", "speed": 9})
        assert made.headers["x-request-id"].startswith("speech-")


def test_upload_decoding_is_not_fooled_by_silence():
    # a valid clip of silence still has a duration: the router does not judge content, only length
    data = encode_audio(np.zeros(24_000 * 3, np.float32), "wav")
    from serve_app.serving.audio import decode_upload

    samples, sr = decode_upload(data)
    assert samples.size / sr == pytest.approx(3.0)


async def test_router_records_into_the_real_metrics_module(caplog):
    from serve_app.serving.metrics import Metrics

    stack = Stack()
    stack.router._metrics = Metrics()
    async with client(stack) as c:
        for body in ({"input": "hi", "response_format": "pcm"}, {"input": "hi", "stream": True},
                     {"input": "hi", "voice": "nobody"}):
            await c.post("/v1/audio/speech", json=body)
        await c.get("/v1/models")
    assert not stack.router._broken_metrics, caplog.text


def test_settings_as_model_dict_or_keywords():
    from router_fakes import FakeS3Gen, FakeT3

    from serve_app.serving.api.router import SpeechRouter
    from serve_app.serving.router_settings import RouterSettings

    fakes = (FakeT3(), FakeS3Gen(), FakeVoices())
    a = SpeechRouter(*fakes, RouterSettings(max_chunk_chars=200, watermark=False), watermarker=None)
    b = SpeechRouter(*fakes, {"max_chunk_chars": 200, "watermark": False}, watermarker=None)
    c = SpeechRouter(*fakes, watermarker=None, max_chunk_chars=200, watermark=False)
    assert a.settings == b.settings == c.settings
    assert SpeechRouter(*fakes, {"max_chunk_chars": 100}, watermarker=None, max_chunk_chars=200).settings \
        .max_chunk_chars == 200
    with pytest.raises(ValueError, match="max_chunk_charz"):
        SpeechRouter(*fakes, watermarker=None, max_chunk_charz=1)


async def test_oversized_bodies_are_refused_before_reading():
    stack = Stack(max_voice_upload_bytes=100_000)
    async with client(stack) as c:
        big = await c.post("/v1/voices", content=b"x" * 10, headers={"content-length": "5000000",
                                                                    "content-type": "multipart/form-data; boundary=b"})
        assert_error(big, 413, code="file_too_large")
        huge_json = await c.post("/v1/audio/speech", content=b"{}", headers={"content-length": str(2 * 1024 * 1024),
                                                                            "content-type": "application/json"})
        assert_error(huge_json, 413, code="body_too_large")


async def test_openapi_lists_every_route():
    async with client(Stack()) as c:
        paths = set((await c.get("/openapi.json")).json()["paths"])
    assert {"/v1/audio/speech", "/v1/models", "/v1/voices", "/v1/voices/{voice_id}", "/healthz", "/readyz",
            "/v1/config", "/v1/memory"} <= paths
