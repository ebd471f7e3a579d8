"""What crosses a Ray Serve handle between the router and the stages: plain, picklable dataclasses. Both the
engine and the serving layer import this module; it imports neither.

No torch, no Starlette objects. Arrays are numpy. The stages' handle methods are:

- S3Gen stage   `synthesize(job: SpeechJob) -> async stream of AudioBlock`   (handle.options(stream=True)).
                One text chunk, end to end: the S3Gen replica starts the chunk's T3 stream itself, feeds the
                token blocks into its vocoder scheduler (stream state stays in the replica for the stream's
                life) and streams audio back. Tokens never pass through the router. Cancelling the caller's
                generator cancels the T3 request and drops the vocoder state.
- T3 stage      `generate(job: T3Job) -> async stream of TokenChunk`   (handle.options(stream=True)).
                Tokens come in blocks: the first of `first_block_tokens`, then at least `block_tokens` each
                (the last one may be shorter); cancelling the caller's generator frees the engine slot.
- Voice stage   `enroll(audio: bytes, name: str | None) -> VoiceInfo`, `list_voices() -> list[VoiceInfo]`,
                `delete(voice_id) -> None`, `get_conds(voice_id) -> VoiceConds`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BUILTIN_VOICE = "default"
SAMPLE_RATE = 24_000
SAMPLES_PER_TOKEN = 960  # 24 kHz / 25 speech tokens per second
SPEECH_TOKEN_RATE = 25
# where a streamed text chunk's time to first audio goes inside the S3Gen replica (AudioBlock.timings): the voice's
# conditionals; T3 until its first token block arrives, as the T3 replica saw it (T3_FIRST_BLOCK_PHASES: waiting for
# a slot + prefill until the first token, decoding until the first block is full) and the rest of that wait
# ("t3_call": the handle calls there and back, T3's voice lookup); waiting for the vocoder loop; the first step
T3_FIRST_BLOCK_PHASES = ("t3_first_token", "t3_first_block")
FIRST_AUDIO_PHASES = ("conds", "t3_call", *T3_FIRST_BLOCK_PHASES, "vocode_wait", "vocode")


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
    first_block_tokens: int = 1   # tokens in the first TokenChunk (fewer only when the request ends first)
    block_tokens: int = 1         # then at least this many per TokenChunk
    priority: int = 0             # T3 admits waiting jobs lower first, in arrival order within one (SpeechJob)


@dataclass(frozen=True)
class TokenChunk:
    request_id: str
    tokens: list[int]          # new speech tokens (< 6561), in order
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    timings: dict[str, float] | None = None  # a request's first block: seconds per T3_FIRST_BLOCK_PHASES in T3


@dataclass(frozen=True)
class SpeechJob:
    """One text chunk for the S3Gen stage, which runs it through T3 and the vocoder."""

    request_id: str
    text: str                  # already normalised by the router (punc_norm)
    voice_id: str
    params: SynthesisParams = field(default_factory=SynthesisParams)
    streaming: bool = True     # False: one block with the whole chunk's audio (one-shot decode, the cheapest)
    first_step_tokens: int = 25   # streaming: tokens of the first vocoder step (time to first audio)
    step_tokens: int = 50         # streaming: the second step's tokens; later steps grow (VocodePolicy)
    t3_block_tokens: int = 16     # T3 sends its tokens to the vocoder in blocks of at least this many
    priority: int = 0             # T3's admission order: 0 a request's first text chunk (its time to first
                                  # audio waits on it), 1 later ones (the chunk before them still plays)


@dataclass(frozen=True)
class AudioBlock:
    request_id: str
    audio: np.ndarray          # float32 [N] at 24 kHz: the new audio since the last block
    num_speech_tokens: int = 0        # speech tokens vocoded into this block (new ones, not the context)
    finished: bool = False
    finish_reason: str | None = None  # with finished: T3's "stop" | "length"
    timings: dict[str, float] | None = None  # a streamed chunk's first audio: seconds per FIRST_AUDIO_PHASES


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
