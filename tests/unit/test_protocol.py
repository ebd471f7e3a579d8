"""Wire models: OpenAI's field order and defaults, Chatterbox knobs fenced after them, no torch import."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from serve_app.serving.protocol import SpeechRequest, VoiceRef


def test_openai_fields_come_first_then_chatterbox_knobs():
    fields = list(SpeechRequest.model_fields)
    assert fields[:7] == ["input", "model", "voice", "instructions", "response_format", "speed", "stream_format"]
    assert fields[7:] == ["exaggeration", "cfg_weight", "temperature", "top_p", "min_p", "repetition_penalty",
                          "seed", "language", "stream"]


def test_defaults_match_openai_and_upstream():
    req = SpeechRequest(input="hi")
    assert (req.voice_name, req.response_format, req.speed, req.stream_format) == ("default", "mp3", 1.0, "audio")
    assert (req.exaggeration, req.cfg_weight, req.temperature, req.min_p, req.repetition_penalty) == (
        0.5, 0.5, 0.8, 0.05, 1.2)
    assert req.is_streaming                                    # OpenAI streams by default
    assert not SpeechRequest(input="hi", stream=False).is_streaming
    assert SpeechRequest(input="hi", stream=False, stream_format="sse").is_streaming


@pytest.mark.parametrize("bad", [
    {"input": ""}, {"input": "x", "speed": 0.2}, {"input": "x", "speed": 4.5}, {"input": "x", "response_format": "ogg"},
    {"input": "x", "stream_format": "chunks"}, {"input": "x", "temperature": 0}, {"input": "x", "seed": -1},
])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValidationError):
        SpeechRequest(**bad)


def test_voice_object_form_and_unknown_fields():
    req = SpeechRequest(input="x", voice={"id": "voice_abc"}, future_field=1)
    assert isinstance(req.voice, VoiceRef) and req.voice_name == "voice_abc"
    assert req.extra_field_names() == ["future_field"]


def test_http_modules_do_not_import_torch():
    code = ("import sys; import serve_app.serving.protocol, serve_app.serving.errors, serve_app.serving.audio, "
            "serve_app.serving.pipeline.chunking, serve_app.serving.api.router, serve_app.serving.api.app, serve_app.serving.pipeline.audio_out, "
            "serve_app.serving.pipeline.pipeline, serve_app.serving.stages.stage_client, serve_app.serving.router_settings; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
