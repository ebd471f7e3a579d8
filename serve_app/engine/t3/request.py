"""What callers hand the engine and what each step hands back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class T3Conditioning:
    """Voice conditioning as upstream's T3Cond holds it (batch of one)."""

    speaker_emb: torch.Tensor  # [1, 256] float
    cond_prompt_speech_tokens: torch.Tensor  # [1, P] int64 (upstream uses P = 150)
    # Kept for callers that mirror upstream's Conditionals; the engine uses T3GenerationRequest.exaggeration,
    # exactly as ChatterboxTTS.generate rebuilds T3Cond with its `exaggeration` argument.
    emotion_adv: float = 0.5
    # The engine's cache of this voice's conditioning embeddings, per (engine, exaggeration): they depend on
    # nothing else, and a voice's object lives as long as the caller keeps it (the stage's per-voice cache).
    embeds: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class T3GenerationRequest:
    request_id: str
    text_tokens: list[int]  # tokenized text WITHOUT SOT/EOT; the engine adds them
    cond: T3Conditioning
    temperature: float = 0.8  # <= 0 means greedy (argmax)
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    cfg_weight: float = 0.5
    exaggeration: float = 0.5
    seed: int | None = None  # None: the engine draws one
    max_new_tokens: int = 1000  # counts every sampled token, the stop token included (as upstream)
    ignore_stop: bool = False  # benchmarks: keep decoding past the stop token until max_new_tokens
    priority: int = 0  # admission: lower first, arrival order within a priority (vLLM's priority scheduling)

    def validate(self) -> None:
        """Raise ValueError naming the bad field; never assert on user input."""
        if not self.text_tokens:
            raise ValueError(f"request {self.request_id!r}: text_tokens is empty; tokenize non-empty text")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"request {self.request_id!r}: top_p={self.top_p} must be in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"request {self.request_id!r}: min_p={self.min_p} must be in [0, 1]")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"request {self.request_id!r}: repetition_penalty={self.repetition_penalty} must be > 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_new_tokens={self.max_new_tokens} must be >= 1")
        if not isinstance(self.cond.cond_prompt_speech_tokens, torch.Tensor):
            raise ValueError(f"request {self.request_id!r}: cond.cond_prompt_speech_tokens is required "
                             "(the speech-prompt tokens of the voice's reference audio)")
        if self.cond.speaker_emb.numel() != 256:
            raise ValueError(f"request {self.request_id!r}: speaker_emb must have 256 values, got {tuple(self.cond.speaker_emb.shape)}")


@dataclass
class T3StepOutput:
    request_id: str
    new_tokens: list[int]  # speech tokens < 6561 produced this step (may be empty)
    finished: bool
    finish_reason: FinishReason | None = None
