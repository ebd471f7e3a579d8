"""Wire models of the OpenAI-compatible speech API (pydantic, no torch).

Request models list OpenAI's fields first, in the order of OpenAI's API reference, then Chatterbox's own knobs
in one fenced block. Response models mirror OpenAI's shapes where OpenAI has one (`/v1/models`, errors, SSE
events) and add fields only where this server has something to say (`random_weights`, `checkpoint`).
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
StreamFormat = Literal["audio", "sse"]

# OpenAI's built-in voice names. A request naming one of them gets the built-in Chatterbox voice, unless a voice
# was enrolled under that exact id (enrolled voices win), so OpenAI clients work unchanged.
OPENAI_VOICE_NAMES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin", "cedar"}
)
# OpenAI's speech model names, accepted as aliases of the served model so SDK defaults work.
OPENAI_TTS_MODEL_NAMES = frozenset({"tts-1", "tts-1-hd", "gpt-4o-mini-tts"})


class OpenAIBaseModel(BaseModel):
    # Unknown fields are ignored (OpenAI adds fields over time); the router logs their names.
    model_config = ConfigDict(extra="allow")

    def extra_field_names(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class VoiceRef(BaseModel):
    """OpenAI's object form of `voice` for custom voices: `{"id": "voice_..."}`."""

    id: str = Field(min_length=1, max_length=128)


class SpeechRequest(OpenAIBaseModel):
    """Body of `POST /v1/audio/speech`."""

    input: str = Field(min_length=1, description="Text to speak; at most `max_input_chars` characters.")
    model: str | None = Field(None, description="The served model name, or an OpenAI TTS model name (alias).")
    voice: str | VoiceRef = Field(
        "default",
        description="'default' (built-in voice), an OpenAI voice name (mapped to the built-in voice unless a voice "
        "with that id was enrolled), or an enrolled voice id (string or {'id': ...}).",
    )
    instructions: str | None = Field(
        None, description="Accepted for OpenAI compatibility and ignored: Chatterbox takes no style prompt."
    )
    response_format: ResponseFormat = Field(
        "mp3", description="pcm is raw 24 kHz 16-bit mono little-endian samples without a header."
    )
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Tempo change without pitch change (ffmpeg atempo).")
    stream_format: StreamFormat = Field(
        "audio", description="'audio': the encoded file as the body; 'sse': speech.audio.delta/done events."
    )

    # --- Chatterbox knobs (not part of OpenAI's API) -------------------------------------------------------------
    exaggeration: float = Field(0.5, ge=0.0, le=2.0, description="Emotion exaggeration (upstream default 0.5).")
    cfg_weight: float = Field(0.5, ge=0.0, le=1.0, description="Classifier-free guidance weight; 0 disables CFG.")
    temperature: float = Field(0.8, gt=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.2, ge=1.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible.")
    language: str | None = Field(None, min_length=2, max_length=8, description="Multilingual checkpoints only.")
    stream: bool | None = Field(
        None,
        description="Unset or true: the audio is sent as it is made (chunked transfer encoding, as OpenAI streams by "
        "default; lowest time to first audio; wav declares an unknown length). false: the whole file is made first "
        "and sent with a Content-Length. stream_format='sse' always streams.",
    )
    # --- end of Chatterbox knobs ---------------------------------------------------------------------------------

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice

    @property
    def is_streaming(self) -> bool:
        """Streams unless the client opted out with `stream: false` (SSE always streams)."""
        return self.stream is not False or self.stream_format == "sse"


class SpeechUsage(BaseModel):
    """Usage in `speech.audio.done`. No text tokenizer runs in the router: input_tokens counts characters."""

    input_tokens: int
    output_tokens: int  # speech tokens generated (25 per second of audio)
    total_tokens: int


class SpeechAudioDeltaEvent(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str  # base64 of the next bytes of the encoded stream in `response_format`


class SpeechAudioDoneEvent(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """The one error body, for every status, streams included."""

    error: ErrorInfo


class ErrorEvent(BaseModel):
    """How an SSE stream ends on failure: same `error` object as ErrorResponse."""

    type: Literal["error"] = "error"
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "resemble-ai"
    random_weights: bool = Field(description="True when the served weights are random (no real checkpoint).")
    checkpoint: str = Field(description="Where the weights came from, e.g. 'hub:ResembleAI/chatterbox@<rev>'.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VoiceObject(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    name: str
    created_at: int
    duration_s: float
    builtin: bool = False


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceObject]


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["voice.deleted"] = "voice.deleted"
    deleted: bool = True


class HealthResponse(BaseModel):
    status: Literal["ok", "ready"]
    stages: dict[str, str] = Field(default_factory=dict)


class MemoryReport(BaseModel):
    """`GET /v1/memory`: each stage's own `memory_report()` dict, unchanged."""

    object: Literal["memory_report"] = "memory_report"
    stages: dict[str, dict[str, Any]]
