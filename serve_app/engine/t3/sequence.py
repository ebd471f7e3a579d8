"""One request's decoding state on the host: ints and lists only (no torch)."""
from __future__ import annotations

from enum import Enum, auto


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Positions follow upstream T3.inference.

    The prefill holds `prompt_len` positions (cond + text + two BOS embeddings, as upstream builds them).
    The first sampled token comes from the prefill; the n-th sampled token (n >= 1) is fed back at RoPE
    position prompt_len + n - 1 with learned speech position n.
    """

    def __init__(self, request_id: str, prompt_len: int, max_new_tokens: int, stop_token: int, priority: int = 0):
        self.request_id = request_id
        self.priority = priority          # admission order: lower first
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens
        self.stop_token = stop_token
        self.slot = -1
        self.token_ids: list[int] = []  # every sampled token, invalid ones (>= 6561) included
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.cancel_requested = False

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)

    @property
    def feed_position(self) -> int:
        """RoPE position where the next decode step writes the last sampled token's K/V."""
        return self.prompt_len + self.num_generated - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token: int) -> bool:
        """Record a sampled token; returns True when the sequence is now finished (stop or length)."""
        if self.is_finished:
            raise RuntimeError(f"sequence {self.request_id!r} is finished; no tokens can be appended")
        self.token_ids.append(token)
        if token == self.stop_token:
            self.finish("stop")
        elif self.num_generated >= self.max_new_tokens:
            self.finish("length")
        return self.is_finished

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, slot={self.slot}, prompt_len={self.prompt_len}, "
                f"generated={self.num_generated}/{self.max_new_tokens}, {self.status.name})")
