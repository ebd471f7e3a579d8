"""Settings of the HTTP router (`SpeechRouter`): limits, chunking, streaming, auth, what /v1/models reports.

The serve config's `router.settings` mapping is validated into this model (unknown keys are an error).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.contracts import SAMPLE_RATE


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # what is served
    model_name: str = Field("chatterbox", description="The model id of /v1/models and the `model` field.")
    is_random_weights: bool = Field(False, description="Weights are random: every speech response says so in "
                                    "the X-Chatterbox-Random-Weights header, /v1/models in `random_weights`.")
    checkpoint_source: str = Field("unknown", description="Where the weights came from, shown by /v1/models.")
    multilingual: bool = Field(False, description="The checkpoint takes `language`; otherwise it is rejected.")

    # text
    max_input_chars: int = Field(4096, ge=1, description="Longest `input` accepted (OpenAI's limit is 4096).")
    max_chunk_chars: int = Field(300, ge=20, description="Longest text chunk sent to T3 in one job.")
    max_new_tokens: int = Field(1000, ge=1, description="Speech token cap per text chunk (25 tokens per second).")
    max_seconds_per_char: float = Field(
        0.25, ge=0, description="A text chunk speaks at most 2 s + this many seconds per character (0.25: 4 "
        "characters a second, a third of normal speech), below max_new_tokens; stops runaway generation, and "
        "random weights, which never emit the stop token. 0: only max_new_tokens.")

    # streaming and joining
    max_active_speech_requests: int = Field(
        48, ge=1, description="Speech requests one router replica runs at once (streams until their end); more get "
        "an OpenAI-shaped 429 with Retry-After. Keep it below the router deployment's max_ongoing_requests (64).")
    first_chunk_tokens: int = Field(25, ge=1, description="Tokens before a text chunk's first streamed vocode.")
    stream_chunk_tokens: int = Field(50, ge=1, description="Tokens between later streamed vocode calls.")
    lookahead_chunks: int = Field(1, ge=0, description="Text chunks T3 may run ahead of the vocoder.")
    first_chunks_first: bool = Field(True, description="T3 admits a request's first text chunk before other "
                                     "requests' later ones (which wait in its queue while the chunk before them "
                                     "plays): time to first audio under load and after a replica restart.")
    crossfade_ms: float = Field(20.0, ge=0, le=500, description="Crossfade between consecutive text chunks.")

    # post-processing and auth
    watermark: bool = Field(True, description="Perth-watermark the audio in the router. Turn off when a stage "
                            "watermarks instead.")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty means no auth. Secret.")

    # voices
    max_voice_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    min_voice_duration_s: float = Field(2.0, gt=0)
    max_voice_duration_s: float = Field(30.0, gt=0)

    # faults
    max_stage_retries: int = Field(
        1, ge=0, description="Times a speech request starts again when a stage replica dies under it before any of "
        "its audio was sent (Serve restarts the replica; the retry waits for a live one). 0: answer 503 at once.")
    max_stall_s: float = Field(
        120.0, ge=0, description="Longest wait for a request's next audio (its first included) from the stages; past "
        "it the request ends with 503 `stage_stalled` (or, once audio was sent, a cut stream / SSE error event) "
        "instead of holding its client. 0: no limit.")

    # stage calls that are not synthesis
    probe_timeout_s: float = Field(5.0, gt=0, description="Timeout of /readyz and /v1/memory stage calls.")

    @model_validator(mode="after")
    def _check(self) -> RouterSettings:
        if self.min_voice_duration_s >= self.max_voice_duration_s:
            raise ValueError(f"min_voice_duration_s={self.min_voice_duration_s} must be below max_voice_duration_s="
                             f"{self.max_voice_duration_s}")
        return self

    @property
    def crossfade_samples(self) -> int:
        return int(round(self.crossfade_ms * SAMPLE_RATE / 1000))

    def public_dict(self) -> dict:
        """The effective settings without secrets (GET /v1/config)."""
        data = self.model_dump(exclude={"api_keys"})
        data["auth_enabled"] = bool(self.api_keys)
        return data
