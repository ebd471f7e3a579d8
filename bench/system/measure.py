"""What one speech request measured, and a level's summary of many. Pure Python (no HTTP, no torch), so the
arithmetic is tested on synthetic chunk timings.

Times are seconds from the moment the request was sent. Audio is counted from body bytes: raw 16-bit mono PCM at
24 kHz, 48,000 bytes a second.

Stall-free: a player that starts at the first audio bytes and plays in real time never runs dry. Chunk i arrives
at t_i carrying a_i seconds; the player has played until t_first + a_0 + ... + a_{i-1} unless it waited before.
A chunk that arrives after that point is a stall (the player waits, then resumes with it). Before the first stall
this is exactly "t_i - t_first > A_{i-1}" with A the audio already received.

Where streams stall: the first late chunk's index i (>= 1; 1 = the chunk right after the first), the audio the
player had played when it first waited (A_{i-1}), and t_i - t_first.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

SAMPLE_RATE = 24_000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # pcm: int16 mono

CANCELLED = "cancelled"  # status of a request cut off at the level's hard deadline


@dataclass
class RequestResult:
    index: int                          # request number within its level
    stream: bool
    text_chars: int
    sent_at: float                      # seconds from the level's start
    status: int | str                   # HTTP status, "exc:<type>" for a transport error, or CANCELLED
    error_code: str | None = None       # `error.code` of an OpenAI-shaped error body
    ttfa_s: float | None = None         # send -> first non-empty audio bytes (non-streaming: = e2e)
    e2e_s: float | None = None          # send -> last byte
    audio_bytes: int = 0
    expected_audio_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)   # arrival of each non-empty read, from send
    chunk_bytes: list[int] = field(default_factory=list)
    retry_after_s: float | None = None  # from a 429's Retry-After header

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def audio_s(self) -> float:
        return self.audio_bytes / BYTES_PER_SECOND

    def audio_received_by(self, level_time_s: float) -> float:
        """Seconds of audio of this request that had arrived at `level_time_s` (seconds from the level's start)."""
        limit = level_time_s - self.sent_at
        return sum(b for t, b in zip(self.chunk_times_s, self.chunk_bytes) if t <= limit) / BYTES_PER_SECOND


@dataclass(frozen=True)
class Stalls:
    """How a real-time player starting at the first chunk fared on one stream."""

    count: int = 0                                  # chunks the player waited for
    waited_s: float = 0.0                           # seconds waited, all stalls
    first_index: int | None = None                  # index of the first late chunk (>= 1); None: no stall
    first_at_played_s: float | None = None          # audio played when it first waited: chunks 0..first_index-1
    first_after_first_audio_s: float | None = None  # first late chunk's arrival - first chunk's arrival


def playback_stalls(chunk_times_s: Sequence[float], chunk_audio_s: Sequence[float],
                    tolerance_s: float = 0.0) -> Stalls:
    """Stalls of a real-time player starting at the first chunk, and where the first one was.
    chunk_times_s: arrival times, ascending; chunk_audio_s: seconds of audio each chunk carries.
    A chunk later than the player's dry point + tolerance_s is a stall: the player resumes with it at its arrival
    (later dry points shift); a gap within the tolerance is forgiven and shifts nothing."""
    if not chunk_times_s:
        return Stalls()
    played_until = chunk_times_s[0] + chunk_audio_s[0]
    num_stalls, waited_s, first = 0, 0.0, None
    for i, (t, a) in enumerate(zip(chunk_times_s[1:], chunk_audio_s[1:]), start=1):
        if t > played_until + tolerance_s:
            if first is None:   # no wait before: the player had played all audio of chunks 0..i-1
                first = (i, math.fsum(chunk_audio_s[:i]), t - chunk_times_s[0])
            num_stalls += 1
            waited_s += t - played_until
            played_until = t + a
        else:
            played_until += a
    return Stalls(num_stalls, waited_s, *(first or (None, None, None)))


STALL_INDEX_TOP = 5   # first late chunks at this index or later share one histogram key, "5+"


def _stall_index_key(index: int) -> str:
    return str(index) if index < STALL_INDEX_TOP else f"{STALL_INDEX_TOP}+"


def _stall_summary(stalls: Sequence[Stalls]) -> dict:
    """Where the streams that stalled stalled first, and how often they stalled; None (hist: {}) for no stalls."""
    stalled = [s for s in stalls if s.count]
    by_key = Counter(_stall_index_key(s.first_index) for s in stalled)
    order = [_stall_index_key(i) for i in range(1, STALL_INDEX_TOP + 1)]
    return {
        "stall_first_chunk_index_hist": {k: by_key[k] for k in order if by_key[k]},   # "1".."4", "5+" -> streams
        "stall_first_at_played_s_p50": percentile([s.first_at_played_s for s in stalled], 50),
        "stall_first_after_first_audio_s_p50": percentile([s.first_after_first_audio_s for s in stalled], 50),
        "stalls_per_stalled_stream_mean": sum(s.count for s in stalled) / len(stalled) if stalled else None,
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _status_key(status: int | str) -> str:
    return str(status)


@dataclass(frozen=True)
class LengthCheck:
    """An OK response's audio "has the capped length" when it lies within
    [min_ratio * expected - tolerance_s, expected + tolerance_s]. Random weights sample speech-vocabulary ids
    >= 6561 too (about a fifth of them), which count against the cap but make no audio: hence min_ratio."""

    tolerance_s: float = 1.0
    min_ratio: float = 0.7

    def matches(self, audio_s: float, expected_s: float) -> bool:
        return self.min_ratio * expected_s - self.tolerance_s <= audio_s <= expected_s + self.tolerance_s


OPENING_S = 0.5   # a closed-loop level's clients send their first requests together, from an idle app: the opening
                  # wave. Its streams' stalls are reported apart as well (a burst, not the steady state)


def _stall_free(stalls: Sequence[Stalls]) -> float | None:
    return sum(1 for s in stalls if s.count == 0) / len(stalls) if stalls else None


def summarize(results: Sequence[RequestResult], *, window_s: float, stall_tolerance_s: float = 0.0,
              length_check: LengthCheck = LengthCheck()) -> dict:
    """A level's numbers from its requests. Throughput counts the audio of OK responses that arrived within
    [0, window_s] of the level's start, over window_s; latencies are over every OK request of the level."""
    ok = [r for r in results if r.ok]
    measured = [r for r in results if r.status != CANCELLED]
    errors = Counter(_status_key(r.status) for r in measured if not r.ok)
    codes = Counter(r.error_code for r in measured if not r.ok and r.error_code)
    window_audio_s = sum(r.audio_received_by(window_s) for r in ok)
    total_audio_s = sum(r.audio_s for r in ok)
    ttfa = [r.ttfa_s for r in ok if r.ttfa_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    streams = [r for r in ok if r.stream and r.chunk_times_s]
    stalls = [playback_stalls(r.chunk_times_s, [b / BYTES_PER_SECOND for b in r.chunk_bytes], stall_tolerance_s)
              for r in streams]
    stall_waits = [s.waited_s for s in stalls]
    opening = [s for r, s in zip(streams, stalls) if r.sent_at < OPENING_S]
    later = [s for r, s in zip(streams, stalls) if r.sent_at >= OPENING_S]
    checked = [r for r in ok if r.expected_audio_s]
    ratios = [r.audio_s / r.expected_audio_s for r in checked]
    last_end = max((r.sent_at + r.e2e_s for r in ok if r.e2e_s is not None), default=0.0)
    return {
        "requests": len(measured),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_status": dict(sorted(errors.items())),
        "error_codes": dict(sorted(codes.items())),
        "cancelled_at_deadline": sum(1 for r in results if r.status == CANCELLED),
        "window_s": window_s,
        "audio_s": total_audio_s,
        "audio_s_per_s": window_audio_s / window_s if window_s > 0 else None,
        # all OK audio over the time until the last OK response ended (drain included)
        "audio_s_per_s_incl_drain": total_audio_s / last_end if last_end > 0 else None,
        "ttfa_p50_s": percentile(ttfa, 50),
        "ttfa_p95_s": percentile(ttfa, 95),
        "ttfa_p99_s": percentile(ttfa, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p95_s": percentile(e2e, 95),
        "e2e_p99_s": percentile(e2e, 99),
        "audio_per_request_p50_s": percentile([r.audio_s for r in ok], 50),
        "stall_free_fraction": _stall_free(stalls),
        "stall_free_opening": _stall_free(opening),        # streams sent in the level's first OPENING_S
        "stall_free_after_opening": _stall_free(later),
        "stall_streams_opening": len(opening),
        "stall_wait_p95_s": percentile(stall_waits, 95),
        "stall_streams": len(stalls),   # OK streams with audio: what the stall numbers are over
        **_stall_summary(stalls),
        "length_checked": len(checked),
        "length_match_fraction": (sum(1 for r in checked if length_check.matches(r.audio_s, r.expected_audio_s))
                                  / len(checked)) if checked else None,
        "audio_to_cap_ratio_p50": percentile(ratios, 50),
        "audio_to_cap_ratio_min": min(ratios) if ratios else None,
        "audio_to_cap_ratio_max": max(ratios) if ratios else None,
    }
