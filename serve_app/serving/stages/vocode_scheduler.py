"""Which vocoder work runs next inside an S3Gen replica: the vocoder's counterpart of T3's continuous batching.

Pure bookkeeping (no torch, no asyncio, no Ray), so it is tested on its own. The stage adds one `VocodeStream`
per text chunk, appends the token blocks T3 sends, and each iteration asks `take_ready(now)` for the streams
that should be vocoded now; all of them run in one engine step (the engine groups rows by length and replays
CUDA graphs per shape).

A stream is ready when
- one-shot (not streaming): T3 has finished; the whole chunk is decoded once;
- streaming, T3 finished: the last step (the rest of the tokens, the held-back audio tail);
- streaming, first step: `first_step_tokens` usable tokens (time to first audio; fewer when the replica is nearly
  idle, `light_first_step_tokens`; more when its steps are long, `first_step_cover`: see `first_step_tokens`; with
  `first_step_predict`, also enough for the steps the streams open now will make, re-checked until it runs);
- streaming, later: `target` usable tokens (which doubles from `step_tokens` up to `max_step_tokens`: fewer,
  larger steps cost less context and batch better), or sooner, with at least `min_step_tokens`, when the
  listener's buffer runs low: less than `low_water_s` of audio left to play at real time since the first block
  (with `urgent_steps`, less than that many of the recent steps' length, if lower: just in time, with every token
  T3 made by then).

"Usable" tokens exclude the flow's look-ahead (`LOOKAHEAD_TOKENS`), which waits for the next block or the end.
Ready streams are taken most urgent first (first steps, then by audio left to play) within `max_batch_new_tokens`
of new tokens per step in all, and streaming rows within `max_stream_batch_tokens` (a step's time is what every
waiting listener waits on: a smaller stream budget keeps steps short and leaves the less urgent streams to the
next step, with more tokens each). With `first_steps_alone`, streams' first steps (time to first audio) run in a
step of their own whenever any is ready, instead of inside a long step of everyone's. With `deadline_steps`, a
stream that still has audio in hand is left to the next step when taking it would make this step (estimated from
the last steps' seconds per flow token, `observe_step`) outlast the audio of a stream already in it, unless it
would run dry itself before a next step could end (one-shot jobs are always taken). At least one stream always
runs.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serve_app.contracts import SPEECH_TOKEN_RATE

LOOKAHEAD_TOKENS = 3    # the flow's pre-look-ahead (flow.pre_lookahead_len): held back until T3 finishes
RECENT_STEPS = 16       # `urgent_steps` times the longest of this many last steps


@dataclass(frozen=True)
class VocodePolicy:
    max_step_tokens: int = 200          # a stream's later steps grow up to this many new tokens
    min_step_tokens: int = 8            # a low buffer triggers a step only with at least this many
    low_water_s: float = 1.0            # step early when less audio than this is left to play
    max_batch_new_tokens: int = 4096    # new tokens vocoded in one engine step, over all streams
    max_stream_batch_tokens: int | None = None   # of those, streaming rows' (None: max_batch_new_tokens)
    first_steps_alone: bool = False     # streams' first steps run in a step of their own, ahead of the rest
    deadline_steps: bool = False        # leave a roomy stream out when it would make the step outlast another's audio
    row_overhead_tokens: int = 60       # flow tokens a row runs besides its new ones (prompt, context, look-ahead)
    light_first_step_tokens: int | None = None   # a first step this short when the replica is nearly idle
    light_load_streams: int = 0         # "nearly idle": at most this many other streams open
    first_step_cover: float | None = None   # grow first steps to cover this many times the wait for the second
    max_first_step_tokens: int = 50     # ... up to this many tokens
    first_step_predict: bool = False    # ... also for the steps the streams open now will make (a burst)
    hold_tokens: int = 4                # audio a step holds back for the join (the engine's 8 overlap frames)
    urgent_steps: float | None = None   # step early only when the audio left lasts at most this many steps

    def __post_init__(self) -> None:
        if self.min_step_tokens < 1 or self.max_step_tokens < self.min_step_tokens:
            raise ValueError(f"need 1 <= min_step_tokens ({self.min_step_tokens}) <= max_step_tokens "
                             f"({self.max_step_tokens})")


@dataclass
class VocodeStream:
    """One text chunk being vocoded. `tokens` grows as T3 blocks arrive; `state` is the backend's stream state."""

    request_id: str
    conds: Any
    seed: int | None
    streaming: bool = True
    first_step_tokens: int = 25
    step_tokens: int = 50
    light_first_step: bool = False      # first_step_tokens was sized for an idle replica: no burst to wait for
    tokens: list[int] = field(default_factory=list)
    t3_finished: bool = False
    finish_reason: str | None = None
    state: Any = None                   # backend stream state (None until the first step; one-shot: unused)
    num_vocoded: int = 0                # tokens whose audio has been produced
    num_steps: int = 0
    num_samples: int = 0                # audio handed out
    first_audio_at: float | None = None
    last_block_at: float | None = None  # time.monotonic() of T3's latest block (observe_block)
    target: int = 0                     # usable tokens that trigger the next (non-urgent) step
    running: bool = False               # in the engine step now
    done: bool = False
    marks: dict[str, float] = field(default_factory=dict)   # time.monotonic() of the first-audio milestones
    t3_timings: dict[str, float] | None = None               # T3's split of the wait for the first block (s)
    steps: list[tuple[int, str]] = field(default_factory=list)   # (new tokens, why) of each finished step

    def __post_init__(self) -> None:
        self.target = self.first_step_tokens

    def usable(self) -> int:
        """New tokens a step could vocode now."""
        held = 0 if self.t3_finished else LOOKAHEAD_TOKENS
        return max(0, len(self.tokens) - held - self.num_vocoded)

    def seconds_left(self, now: float, sample_rate: int) -> float:
        """Audio handed out but not yet played, for a listener who started at the first block (inf before it)."""
        if self.first_audio_at is None:
            return math.inf
        return self.num_samples / sample_rate - (now - self.first_audio_at)


@dataclass
class StepPlan:
    """One stream's part of an engine step: its tokens so far (a snapshot) and whether it is the last step."""

    stream: VocodeStream
    tokens: list[int]
    finalize: bool
    reason: str = ""    # why it runs now: first, target, urgent, final, one-shot (`ready_reason`)

    @property
    def num_new(self) -> int:
        held = 0 if self.finalize else LOOKAHEAD_TOKENS
        return max(0, len(self.tokens) - held - self.stream.num_vocoded)


def _ema(prev: float | None, value: float) -> float:
    return value if prev is None else 0.7 * prev + 0.3 * value


def _first_step(s: VocodeStream) -> bool:
    return s.streaming and s.num_steps == 0


class VocodeScheduler:
    def __init__(self, policy: VocodePolicy | None = None, sample_rate: int = 24_000):
        self.policy = policy or VocodePolicy()
        self.sample_rate = sample_rate
        self.streams: dict[str, VocodeStream] = {}
        self.seconds_per_flow_token: float | None = None   # moving average over steps (observe_step)
        self.step_seconds: float | None = None             # moving average of a step's time (observe_step)
        self.t3_seconds_per_token: float | None = None     # moving average of T3's pace per stream (observe_block)
        self.block_tokens = 16                             # T3's later blocks (first_step_tokens' block_tokens)
        self.min_step_seconds: float | None = None         # the shortest step seen: a step's fixed part
        self.seconds_per_step_token: float | None = None   # moving average of (step - fixed part) / step_cost
        self.recent_steps: deque[float] = deque(maxlen=RECENT_STEPS)   # the last steps' seconds (urgent_steps)

    def row_cost(self, plan: StepPlan) -> int:
        """Flow tokens a row runs: its new tokens and the row's overhead. A step's time is estimated from these."""
        return plan.num_new + self.policy.row_overhead_tokens

    def step_cost(self, plans: list[StepPlan]) -> int:
        return sum(self.row_cost(p) for p in plans)

    def observe_step(self, seconds: float, cost: int) -> None:
        """A finished engine step's time and `step_cost`: the estimate `deadline_steps` uses."""
        if cost <= 0 or seconds <= 0:
            return
        self.seconds_per_flow_token = _ema(self.seconds_per_flow_token, seconds / cost)
        self.step_seconds = _ema(self.step_seconds, seconds)
        self.recent_steps.append(seconds)
        self.min_step_seconds = seconds if self.min_step_seconds is None else min(self.min_step_seconds, seconds)
        extra = seconds - self.min_step_seconds
        if extra > 0.25 * seconds:   # only a step well above the fixed part says what a flow token costs
            self.seconds_per_step_token = _ema(self.seconds_per_step_token, extra / cost)

    def observe_block(self, s: VocodeStream, num_tokens: int, now: float) -> None:
        """T3 sent `s` a block of `num_tokens`: its pace since the stream's previous block feeds the estimate of
        how long a later block takes (the first block's wait includes T3's queue and prefill: not a pace)."""
        if num_tokens > 0 and s.last_block_at is not None:
            self.t3_seconds_per_token = _ema(self.t3_seconds_per_token, (now - s.last_block_at) / num_tokens)
        if num_tokens > 0:
            s.last_block_at = now

    def add(self, stream: VocodeStream) -> None:
        if stream.request_id in self.streams:
            raise ValueError(f"stream {stream.request_id!r} is already open in this replica")
        self.streams[stream.request_id] = stream

    def remove(self, request_id: str) -> VocodeStream | None:
        return self.streams.pop(request_id, None)

    def __len__(self) -> int:
        return len(self.streams)

    def first_step_tokens(self, requested: int, block_tokens: int = 16) -> int:
        """A new stream's first step (call before `add`):
        - the policy's light-load size when at most `light_load_streams` other streams are open (T3 then makes
          tokens many times faster than they play, so the second block comes long before a short first one has
          played);
        - with `first_step_cover`, enough tokens that the first step's audio (less what it holds back for the
          join) lasts `first_step_cover` times the expected wait for the second step's audio: T3's next block of
          `block_tokens` at its observed pace, then up to two steps (the one running, and the stream's own), at
          their observed length; never fewer than `requested`, at most `max_first_step_tokens`;
        - else `requested`."""
        p = self.policy
        if p.light_first_step_tokens is not None and len(self.streams) <= p.light_load_streams:
            return min(requested, p.light_first_step_tokens)
        if p.first_step_cover is None or self.step_seconds is None or self.t3_seconds_per_token is None:
            return requested
        self.block_tokens = block_tokens
        need = max(self._cover_tokens(self.step_seconds), self.predicted_first_step(self._num_first_steps() + 1))
        return max(requested, min(need, p.max_first_step_tokens))

    def _cover_tokens(self, step_s: float) -> int:
        """First-step tokens whose audio lasts `first_step_cover` times T3's next block and two steps of step_s."""
        wait_s = self.t3_seconds_per_token * self.block_tokens + 2 * step_s
        return math.ceil(self.policy.first_step_cover * wait_s * SPEECH_TOKEN_RATE) + self.policy.hold_tokens

    def predicted_step_seconds(self, num_streams: int) -> float | None:
        """A step's length when `num_streams` streams each step in every step: each row runs `row_overhead_tokens`
        plus the audio a step's length plays, D = fixed + rate * N * (overhead + 25 D), from the shortest step
        (fixed) and the observed cost of a flow token above it (rate; where N * rate * 25 nears 1 the vocoder
        cannot keep up, and D is held at 5 times its size without the audio). Unlike the observed steps, it knows
        the streams that have just arrived: a burst on a replica whose last steps were light."""
        rate, fixed = self.seconds_per_step_token, self.min_step_seconds
        if rate is None or fixed is None:
            return None
        n = num_streams
        return (fixed + rate * n * self.policy.row_overhead_tokens) / max(0.2, 1 - rate * n * SPEECH_TOKEN_RATE)

    def _num_first_steps(self) -> int:
        """Streams before their first step: a burst's streams, which will step together from then on."""
        return sum(1 for s in self.streams.values() if s.streaming and s.num_steps == 0 and not s.done)

    def predicted_first_step(self, num_streams: int) -> int:
        """With `first_step_predict`, the first-step tokens that cover two steps predicted for `num_streams`
        streams stepping together (the streams before their first step: few in a steady state, where the observed
        steps say more, many in a burst); 0 when off or nothing is observed yet; at most `max_first_step_tokens`."""
        p = self.policy
        if not p.first_step_predict or p.first_step_cover is None or self.t3_seconds_per_token is None:
            return 0
        step_s = self.predicted_step_seconds(num_streams)
        return 0 if step_s is None else min(self._cover_tokens(step_s), p.max_first_step_tokens)

    def _burst_need(self) -> int:
        """With `first_step_predict`, the tokens a first step waits for: enough for the steps predicted for every
        stream before its first step (0 when off). O(streams): `take_ready` computes it once for all of them."""
        return self.predicted_first_step(self._num_first_steps()) if self.policy.first_step_predict else 0

    def ready_reason(self, s: VocodeStream, now: float, burst_need: int | None = None) -> str | None:
        """Why `s` should step now (first, target, urgent, final, one-shot), or None. A stream's first step is
        "first" even when T3 is done (it is then its last too): each text chunk has one first or one-shot step.
        burst_need: `_burst_need()`, when the caller has it."""
        if s.running or s.done:
            return None
        if not s.streaming:
            return "one-shot" if s.t3_finished else None
        if s.t3_finished:
            return "first" if s.num_steps == 0 else "final"   # every chunk has one first (or one-shot) step
        n = s.usable()
        if s.num_steps == 0 and not s.light_first_step and n < (
                self._burst_need() if burst_need is None else burst_need):
            return None   # a burst arrived with this stream: its first step waits for the audio to cover it
        if n >= s.target:
            return "first" if s.num_steps == 0 else "target"
        if (s.num_steps > 0 and n >= self.policy.min_step_tokens
                and s.seconds_left(now, self.sample_rate) < self.low_water(s)):
            return "urgent"
        return None

    def low_water(self, s: VocodeStream) -> float:
        """Audio left to play under which `s` steps early (with at least `min_step_tokens`): `low_water_s`; with
        `urgent_steps`, no more than that many of the longest recent step, so that where steps are short a stream
        does not take several small steps (each re-runs context and look-ahead) but one just in time."""
        p = self.policy
        if p.urgent_steps is None or not self.recent_steps:
            return p.low_water_s
        return min(p.low_water_s, p.urgent_steps * max(self.recent_steps))   # the longest, not the mean: under load
        # a mean let chunks run late (test_urgent_steps_keeps_streams_in_time_under_load)

    def _urgency(self, s: VocodeStream, now: float) -> tuple:
        # streams' first steps first (time to first audio), then by audio left to play; a one-shot job ranks as
        # a stream at the low-water mark (it is not starved by streams with plenty left)
        if not s.streaming:
            return (1, self.policy.low_water_s)
        if _first_step(s):
            return (0, 0.0)
        return (1, s.seconds_left(now, self.sample_rate))

    def take_ready(self, now: float) -> list[StepPlan]:
        """The streams to vocode in the next engine step, marked running; their token snapshots."""
        need = self._burst_need()
        reasons = {s.request_id: r for s in self.streams.values()
                   if (r := self.ready_reason(s, now, need)) is not None}
        ready = sorted((self.streams[i] for i in reasons), key=lambda s: self._urgency(s, now))
        if self.policy.first_steps_alone and any(_first_step(s) for s in ready):
            ready = [s for s in ready if _first_step(s)]   # the rest go in the next step, with more tokens each
        plans: list[StepPlan] = []
        budget = self.policy.max_batch_new_tokens
        stream_budget = self.policy.max_stream_batch_tokens
        stream_budget = budget if stream_budget is None else stream_budget
        rate = self.seconds_per_flow_token if self.policy.deadline_steps else None
        cost, deadline = 0, math.inf      # flow tokens taken; the least audio in hand among the streams taken (s)
        for s in ready:
            plan = StepPlan(s, list(s.tokens), finalize=s.t3_finished, reason=reasons[s.request_id])
            if plans and (plan.num_new > budget or (s.streaming and plan.num_new > stream_budget)):
                continue
            row_cost = self.row_cost(plan)
            left = s.seconds_left(now, self.sample_rate) if s.streaming else math.inf
            if plans and rate is not None and s.streaming:
                est = rate * (cost + row_cost)   # this step's time with s in it
                if est > deadline and left >= 2 * est:
                    continue   # s has audio for this step and the next: it would only make the others wait
            budget -= plan.num_new
            if s.streaming:
                stream_budget -= plan.num_new
            cost += row_cost
            deadline = min(deadline, left)
            s.running = True
            plans.append(plan)
        return plans

    def finish_step(self, plan: StepPlan, num_samples: int, now: float, num_vocoded: int | None = None) -> None:
        """Book a step's result: tokens vocoded (the backend's own count when it keeps one: a step too small to
        make audio leaves its tokens for the next), audio handed out; grows the stream's next target."""
        s = plan.stream
        s.running = False
        before = s.num_vocoded
        s.num_vocoded = s.num_vocoded + plan.num_new if num_vocoded is None else num_vocoded
        s.num_steps += 1
        s.steps.append((s.num_vocoded - before, plan.reason))
        s.num_samples += num_samples
        if num_samples and s.first_audio_at is None:
            s.first_audio_at = now
        s.target = s.step_tokens if s.num_steps == 1 else 2 * s.target
        s.target = min(s.target, self.policy.max_step_tokens)
        if plan.finalize:
            s.done = True

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until a waiting stream's buffer reaches the low-water mark (None: nothing to wait for)."""
        soonest = None
        for s in self.streams.values():
            if s.running or s.done or not s.streaming or s.num_steps == 0 or s.t3_finished:
                continue
            if s.usable() < self.policy.min_step_tokens:
                continue   # its next block from T3 wakes the loop
            dt = max(0.0, s.seconds_left(now, self.sample_rate) - self.low_water(s))
            soonest = dt if soonest is None else min(soonest, dt)
        return soonest
