"""What crosses a Ray Serve handle between the router and the stages: plain, picklable dataclasses.

No torch, no Starlette objects. Arrays are numpy. The stages' handle methods are:

- T3 stage      `generate(job: T3Job) -> async stream of TokenChunk`   (call with handle.options(stream=True));
                cancelling the caller's generator cancels the request and frees its engine slot.
- S3Gen stage   `vocode(job: VocodeJob) -> VocodeResult`  (batched inside the replica with @serve.batch).
                One-shot decode: finalize=True, stream_state=None. Streaming: call again with the growing token
                prefix and the StreamState returned last time; the replica itself keeps no per-stream state.
- Voice stage   `enroll(audio: bytes, name: str | None) -> VoiceInfo`, `list_voices() -> list[VoiceInfo]`,
                `delete(voice_id) -> None`, `get_conds(voice_id) -> VoiceConds`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

BUILTIN_VOICE = "default"
SAMPLE_RATE = 24_000
SAMPLES_PER_TOKEN = 960  # 24 kHz / 25 speech tokens per second
SPEECH_TOKEN_RATE = 25


@dataclass(frozen=True)
class SynthesisParams:
    """Chatterbox's own knobs (upstream defaults)."""

    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    seed: int | None = None
    language: str | None = None  # multilingual checkpoints only
    max_new_tokens: int = 1000   # cap on speech tokens for one text chunk (40 s of audio)


@dataclass(frozen=True)
class T3Job:
    request_id: str
    text: str                  # one text chunk, already normalised by the router (punc_norm)
    voice_id: str
    params: SynthesisParams = field(default_factory=SynthesisParams)


@dataclass(frozen=True)
class TokenChunk:
    request_id: str
    tokens: list[int]          # new speech tokens (< 6561), in order
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"


@dataclass
class StreamState:
    """Carried between streaming vocode calls by the router; opaque to it."""

    num_mel_frames_emitted: int = 0
    num_samples_emitted: int = 0
    hift_cache_source: np.ndarray | None = None   # [1, 1, S] float32
    tail_audio: np.ndarray | None = None          # float32, kept back for the crossfade
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VocodeJob:
    request_id: str
    speech_tokens: list[int]   # the whole token prefix so far (streaming) or all tokens (one-shot)
    voice_id: str
    finalize: bool = True
    stream_state: StreamState | None = None
    seed: int | None = None


@dataclass(frozen=True)
class VocodeResult:
    request_id: str
    audio: np.ndarray          # float32 [N] at 24 kHz: the *new* audio since the last call
    stream_state: StreamState | None = None


@dataclass(frozen=True)
class VoiceConds:
    """Upstream `Conditionals` (conds.pt) as numpy, so it crosses a handle without torch."""

    t3_speaker_emb: np.ndarray                # [1, 256] float32
    t3_cond_prompt_speech_tokens: np.ndarray  # [1, P] int64 (P <= 150)
    t3_emotion_adv: float                     # exaggeration the voice was enrolled with
    gen_prompt_token: np.ndarray              # [1, T] int64
    gen_prompt_token_len: np.ndarray          # [1] int64
    gen_prompt_feat: np.ndarray               # [1, 2T, 80] float32
    gen_embedding: np.ndarray                 # [1, 192] float32


@dataclass(frozen=True)
class VoiceInfo:
    voice_id: str
    name: str
    created_at: int            # unix seconds
    duration_s: float          # of the reference clip
    builtin: bool = False
