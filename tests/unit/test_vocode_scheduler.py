"""The S3Gen replica's vocoder scheduler, alone (pure Python): readiness, growth, urgency, budget, wake-ups."""
from __future__ import annotations

import math

import pytest

from serve_app.serving.stages.vocode_scheduler import (
    LOOKAHEAD_TOKENS,
    StepPlan,
    VocodePolicy,
    VocodeScheduler,
    VocodeStream,
)

SR = 24_000


def _stream(rid, **kw):
    return VocodeStream(rid, conds=None, seed=None, **kw)


def _run(sched: VocodeScheduler, plans: list[StepPlan], now: float, seconds_per_token: float = 0.04) -> None:
    for p in plans:
        sched.finish_step(p, int(p.num_new * seconds_per_token * SR), now)


def test_first_step_waits_for_first_step_tokens_plus_lookahead():
    sched = VocodeScheduler(VocodePolicy(), SR)
    s = _stream("a", first_step_tokens=25, step_tokens=50)
    sched.add(s)
    s.tokens.extend(range(25 + LOOKAHEAD_TOKENS - 1))
    assert sched.take_ready(0.0) == []
    s.tokens.append(0)
    (plan,) = sched.take_ready(0.0)
    assert plan.num_new == 25 and not plan.finalize and s.running
    assert sched.take_ready(0.0) == []          # running streams are not taken twice


def test_later_steps_grow_to_max_and_last_step_flushes():
    sched = VocodeScheduler(VocodePolicy(max_step_tokens=200, low_water_s=0.0), SR)
    s = _stream("a", first_step_tokens=25, step_tokens=50)
    sched.add(s)
    sizes = []
    for total in range(1, 1000):
        s.tokens.append(1)
        for p in sched.take_ready(0.0):
            sizes.append(p.num_new)
            _run(sched, [p], 0.0)
    assert sizes[:5] == [25, 50, 100, 200, 200]
    s.t3_finished = True
    (last,) = sched.take_ready(0.0)
    assert last.finalize and last.num_new == len(s.tokens) - s.num_vocoded
    _run(sched, [last], 0.0)
    assert s.done and s.num_vocoded == len(s.tokens) and sched.take_ready(0.0) == []


def test_low_buffer_steps_early_and_next_wakeup_says_when():
    sched = VocodeScheduler(VocodePolicy(min_step_tokens=8, low_water_s=1.0), SR)
    s = _stream("a", first_step_tokens=25, step_tokens=50)
    sched.add(s)
    s.tokens.extend(range(28))
    _run(sched, sched.take_ready(10.0), 10.0)            # 1 s of audio handed out at t=10
    s.tokens.extend(range(10))                           # 10 usable: below the 50 target
    assert sched.take_ready(10.0) == []                  # 1.0 s left to play: not low yet
    assert sched.next_wakeup(10.0) == pytest.approx(0.0, abs=1e-9) or sched.next_wakeup(10.0) >= 0
    assert sched.take_ready(10.5) and s.running          # 0.5 s left < 1.0 s: steps early with 10 tokens


def test_next_wakeup_is_when_the_buffer_reaches_low_water():
    sched = VocodeScheduler(VocodePolicy(min_step_tokens=8, low_water_s=1.0), SR)
    s = _stream("a", first_step_tokens=25, step_tokens=50)
    sched.add(s)
    s.tokens.extend(range(78))
    _run(sched, sched.take_ready(0.0), 0.0)              # 75 tokens -> 3 s of audio at t=0
    s.tokens.extend(range(10))
    assert sched.next_wakeup(0.0) == pytest.approx(2.0)
    assert sched.next_wakeup(0.0) is not None and not sched.take_ready(1.9)
    assert sched.take_ready(2.01)


def test_one_shot_waits_for_t3_and_urgency_orders_first_steps_first():
    sched = VocodeScheduler(VocodePolicy(), SR)
    once = _stream("once", streaming=False)
    late = _stream("late", first_step_tokens=10, step_tokens=10)
    new = _stream("new", first_step_tokens=10, step_tokens=10)
    for s in (once, late, new):
        sched.add(s)
    once.tokens.extend(range(100))
    late.tokens.extend(range(13))
    _run(sched, sched.take_ready(0.0), 0.0)              # late's first step
    assert not once.running
    late.tokens.extend(range(20))
    new.tokens.extend(range(13))
    once.t3_finished = True
    plans = sched.take_ready(0.0)
    assert [p.stream.request_id for p in plans][0] == "new" and {p.stream.request_id for p in plans} == {
        "new", "late", "once"}
    assert next(p for p in plans if p.stream is once).finalize


def test_budget_caps_new_tokens_per_step_but_always_runs_one():
    sched = VocodeScheduler(VocodePolicy(max_batch_new_tokens=60), SR)
    streams = [_stream(f"s{i}", first_step_tokens=25, step_tokens=50) for i in range(4)]
    for s in streams:
        sched.add(s)
        s.tokens.extend(range(28))
    plans = sched.take_ready(0.0)
    assert [p.num_new for p in plans] == [25, 25]
    big = VocodeScheduler(VocodePolicy(max_batch_new_tokens=10), SR)
    s = _stream("big", streaming=False)
    big.add(s)
    s.tokens.extend(range(500))
    s.t3_finished = True
    assert [p.num_new for p in big.take_ready(0.0)] == [500]


def test_seconds_left_and_duplicate_ids():
    s = _stream("a")
    assert s.seconds_left(0.0, SR) == math.inf
    s.first_audio_at, s.num_samples = 1.0, 2 * SR
    assert s.seconds_left(2.5, SR) == pytest.approx(0.5)
    sched = VocodeScheduler()
    sched.add(s)
    with pytest.raises(ValueError, match="already open"):
        sched.add(_stream("a"))
    assert sched.remove("a") is s and sched.remove("a") is None


def test_stream_budget_bounds_streaming_rows_not_one_shot_jobs():
    sched = VocodeScheduler(VocodePolicy(max_batch_new_tokens=1000, max_stream_batch_tokens=60), SR)
    streams = [_stream(f"s{i}", first_step_tokens=25, step_tokens=50) for i in range(4)]
    for s in streams:
        sched.add(s)
        s.tokens.extend(range(28))
    jobs = [_stream(f"j{i}", streaming=False) for i in range(2)]
    for j in jobs:
        sched.add(j)
        j.tokens.extend(range(300))
        j.t3_finished = True
    plans = sched.take_ready(0.0)
    # two first steps fit the stream budget (25 + 25 <= 60), both one-shot jobs fit the step's budget
    assert sorted(p.stream.request_id for p in plans) == ["j0", "j1", "s0", "s1"]
    assert sum(p.num_new for p in plans if p.stream.streaming) == 50
    # the left-over streams run next step
    for p in plans:
        sched.finish_step(p, 0, 0.0)
    assert sorted(p.stream.request_id for p in sched.take_ready(0.0)) == ["s2", "s3"]


def test_first_steps_alone_run_apart_from_later_steps_and_one_shot_jobs():
    def setup(alone: bool):
        sched = VocodeScheduler(VocodePolicy(first_steps_alone=alone), SR)
        old = _stream("old", first_step_tokens=10, step_tokens=20)      # past its first step, buffer low
        sched.add(old)
        old.tokens.extend(range(13))
        _run(sched, sched.take_ready(0.0), 0.0)
        old.tokens.extend(range(30))
        job = _stream("job", streaming=False)
        sched.add(job)
        job.tokens.extend(range(100))
        job.t3_finished = True
        new = [_stream(f"new{i}", first_step_tokens=10, step_tokens=20) for i in range(2)]
        for s in new:
            sched.add(s)
            s.tokens.extend(range(13))
        return sched

    mixed = setup(alone=False)
    assert sorted(p.stream.request_id for p in mixed.take_ready(0.1)) == ["job", "new0", "new1", "old"]
    sched = setup(alone=True)
    first = sched.take_ready(0.1)
    assert sorted(p.stream.request_id for p in first) == ["new0", "new1"]
    assert all(p.num_new == 10 for p in first)
    _run(sched, first, 0.2)
    # the others go next, still in one step; the new streams are not ready again with 0 new tokens
    assert sorted(p.stream.request_id for p in sched.take_ready(0.2)) == ["job", "old"]
    # no first step waiting: steps are as before
    assert sched.take_ready(0.2) == []


def _low_and_roomy(deadline_steps: bool) -> tuple[VocodeScheduler, VocodeStream, list[VocodeStream]]:
    """One stream 0.3 s from running dry with 16 new tokens, three with 4 s of audio in hand and 100 each."""
    sched = VocodeScheduler(VocodePolicy(deadline_steps=deadline_steps, row_overhead_tokens=60), SR)
    low = _stream("low", first_step_tokens=10, step_tokens=20)
    roomy = [_stream(f"roomy{i}", first_step_tokens=100, step_tokens=100) for i in range(3)]
    for s in (low, *roomy):
        sched.add(s)
    low.tokens.extend(range(13))
    for s in roomy:
        s.tokens.extend(range(103))
    _run(sched, sched.take_ready(0.0), 0.0)              # low: 10 tokens = 0.4 s; roomy: 100 tokens = 4 s
    low.tokens.extend(range(16))
    for s in roomy:
        s.tokens.extend(range(100))
    return sched, low, roomy


def test_deadline_steps_leave_roomy_streams_to_the_next_step():
    # at 1 ms per flow token: low costs 76 flow tokens, each roomy row 160. low + one roomy row: 0.236 s, within
    # low's 0.3 s of audio; a second roomy row would make it 0.396 s. The roomy streams have 3.9 s: they can wait
    plain, _, _ = _low_and_roomy(deadline_steps=False)
    plain.observe_step(1.0, 1000)
    assert len(plain.take_ready(0.1)) == 4               # the option off: everyone in one step
    sched, low, roomy = _low_and_roomy(deadline_steps=True)
    sched.observe_step(1.0, 1000)
    assert sched.seconds_per_flow_token == pytest.approx(0.001)
    plans = sched.take_ready(0.1)
    assert [p.stream.request_id for p in plans] == ["low", "roomy0"] and sched.step_cost(plans) == 76 + 160
    _run(sched, plans, 0.35)
    # next step: the two left over (nobody in it is short of audio)
    assert sorted(p.stream.request_id for p in sched.take_ready(0.35)) == ["roomy1", "roomy2"]


def test_deadline_steps_take_a_stream_that_would_run_dry_before_a_next_step():
    sched, low, roomy = _low_and_roomy(deadline_steps=True)
    sched.observe_step(1.0, 1000)
    # 3.7 s later the roomy streams have 0.3 s left, low is dry (-3.4 s): every one of them is short of a next step
    assert len(sched.take_ready(3.7)) == 4


def test_deadline_steps_need_an_observed_step_and_keep_one_shot_jobs():
    sched, low, roomy = _low_and_roomy(deadline_steps=True)
    assert sched.seconds_per_flow_token is None
    assert len(sched.take_ready(0.1)) == 4               # no estimate yet: the rule does not apply
    sched, low, roomy = _low_and_roomy(deadline_steps=True)
    sched.observe_step(1.0, 1000)
    job = _stream("job", streaming=False)
    sched.add(job)
    job.tokens.extend(range(300))
    job.t3_finished = True
    assert sorted(p.stream.request_id for p in sched.take_ready(0.1)) == ["job", "low"]
    sched.observe_step(0.0, 10)                          # nothing to learn from an empty measurement
    sched.observe_step(2.0, 1000)                        # a moving average, not the last step alone
    assert sched.seconds_per_flow_token == pytest.approx(0.7 * 0.001 + 0.3 * 0.002)


def test_light_load_shortens_the_first_step_only_when_nearly_idle():
    sched = VocodeScheduler(VocodePolicy(), SR)
    assert sched.first_step_tokens(15) == 15                  # off by default
    sched.policy = VocodePolicy(light_first_step_tokens=8)
    assert sched.first_step_tokens(15) == 8                   # idle replica
    sched.add(_stream("x"))
    assert sched.first_step_tokens(15) == 15                  # by default only an idle one
    sched.remove("x")
    sched.policy = VocodePolicy(light_first_step_tokens=8, light_load_streams=1)
    assert sched.first_step_tokens(5) == 5                    # never longer than asked
    sched.add(_stream("a"))
    assert sched.first_step_tokens(15) == 8                   # one other stream: still light
    sched.add(_stream("b"))
    assert sched.first_step_tokens(15) == 15                  # two others: the router's size


def test_first_step_cover_grows_first_steps_when_steps_are_long():
    sched = VocodeScheduler(VocodePolicy(first_step_cover=1.5, max_first_step_tokens=50), SR)
    busy = _stream("busy")
    sched.add(busy)
    assert sched.first_step_tokens(15) == 15                  # no estimates yet: the router's size
    sched.observe_block(busy, 18, 0.0)                        # a first block: no pace yet
    assert sched.t3_seconds_per_token is None
    sched.observe_block(busy, 16, 0.16)                       # 16 tokens in 0.16 s: 10 ms a token
    assert sched.t3_seconds_per_token == pytest.approx(0.01)
    sched.observe_step(0.3, 1000)                             # steps of 0.3 s
    # wait = 16 x 10 ms + 2 x 0.3 s = 0.76 s; x 1.5 = 1.14 s of audio = 28.5 -> 29 tokens, + 4 held back
    assert sched.first_step_tokens(15, block_tokens=16) == 33
    for _ in range(20):
        sched.observe_step(0.02, 1000)                        # short steps: (0.16 + 0.04) x 1.5 -> 8 + 4 tokens
    assert sched.first_step_tokens(15) == 15                  # never below the router's size
    for _ in range(20):
        sched.observe_step(3.0, 1000)
    assert sched.first_step_tokens(15) == 50                  # capped
    sched.remove("busy")
    sched.policy = VocodePolicy(first_step_cover=1.5, light_first_step_tokens=8)
    assert sched.first_step_tokens(15) == 8                   # an idle replica still takes the light step


def _light_load_stream(n_tokens: int, urgent_steps: float | None, t3_s_per_token: float, step_fixed_s: float):
    """One stream through the scheduler on a model clock: T3 sends a first block of 8 + 3 look-ahead tokens, then
    blocks of 16 at `t3_s_per_token`; a step takes `step_fixed_s` + 0.27 ms a new token (the served H200 fit).
    -> (new tokens of each step, seconds the listener waited)."""
    sched = VocodeScheduler(VocodePolicy(min_step_tokens=16, low_water_s=1.0, urgent_steps=urgent_steps), SR)
    s = _stream("a", first_step_tokens=8, step_tokens=50)
    sched.add(s)
    blocks, made, at, size = [], 0, 0.02, 8 + LOOKAHEAD_TOKENS
    while made < n_tokens:
        k = min(size, n_tokens - made)
        made, at, size = made + k, at + k * t3_s_per_token, 16
        blocks.append((at, k, made >= n_tokens))
    now, steps, waited = 0.0, [], 0.0
    while not s.done:
        while blocks and blocks[0][0] <= now:
            at, k, last = blocks.pop(0)
            s.tokens += [1] * k
            s.t3_finished = last
            sched.observe_block(s, k, at)
        plans = sched.take_ready(now)
        if plans:
            (p,) = plans
            seconds = step_fixed_s + 0.00027 * p.num_new
            steps.append(p.num_new)
            if s.first_audio_at is not None:
                waited += max(0.0, -s.seconds_left(now + seconds, SR))
            sched.observe_step(seconds, sched.step_cost(plans))
            now += seconds
            held = 0 if p.finalize else 4
            sched.finish_step(p, (p.num_new - held + (4 if len(steps) > 1 else 0)) * 960, now)
            continue
        wake = [blocks[0][0]] if blocks else []
        if (w := sched.next_wakeup(now)) is not None:
            wake.append(now + max(w, 1e-4))
        now = min(wake)
    return steps, waited


@pytest.mark.parametrize("n_tokens", [60, 95, 250])
def test_urgent_steps_takes_fewer_steps_at_light_load_and_changes_nothing_when_slow(n_tokens):
    fast = dict(t3_s_per_token=0.0039, step_fixed_s=0.045)         # one stream on an H200 as served: 3.9 ms a token
    before, waited_before = _light_load_stream(n_tokens, None, **fast)
    after, waited_after = _light_load_stream(n_tokens, 3.0, **fast)
    assert sum(before) == sum(after) == n_tokens and waited_before == waited_after == 0.0
    assert len(after) < len(before), (before, after)              # fewer context + look-ahead re-runs
    slow = dict(t3_s_per_token=0.04, step_fixed_s=0.4)            # T3 at real time, long steps: low water stands
    assert _light_load_stream(n_tokens, 3.0, **slow) == _light_load_stream(n_tokens, None, **slow)


def test_each_step_records_its_new_tokens_and_why_it_ran():
    """A stream's `steps` say what the scheduler did with it (the S3Gen stage logs them when the stream ends):
    one stream at light load on the model clock takes its first step, two urgent ones, then the final step."""
    steps, _ = _light_load_stream(95, None, t3_s_per_token=0.003, step_fixed_s=0.045)
    sched = VocodeScheduler(VocodePolicy(min_step_tokens=4, low_water_s=0.2), SR)
    s = _stream("a", first_step_tokens=4, step_tokens=8)
    sched.add(s)
    s.tokens.extend(range(4 + LOOKAHEAD_TOKENS))
    _run(sched, sched.take_ready(0.0), 0.0)                    # first: 4 tokens, 0.16 s of audio
    s.tokens.extend(range(8))
    _run(sched, sched.take_ready(0.0), 0.0)                    # target: 8 usable
    s.tokens.extend(range(4))
    assert sched.take_ready(0.0) == []                         # 4 usable, audio in hand
    (plan,) = sched.take_ready(5.0)                            # the buffer ran low
    _run(sched, [plan], 5.0)
    s.t3_finished = True
    _run(sched, sched.take_ready(5.0), 5.0)
    assert s.steps == [(4, "first"), (8, "target"), (4, "urgent"), (3, "final")]
    one = _stream("b", streaming=False)
    sched.add(one)
    one.tokens.extend(range(30))
    one.t3_finished = True
    (plan,) = sched.take_ready(5.0)
    assert plan.reason == "one-shot"
    done = _stream("c")                                         # T3 done before the first step: still "first"
    sched.add(done)
    done.tokens.extend(range(5))
    done.t3_finished = True
    (plan,) = sched.take_ready(5.0)
    assert plan.reason == "first" and plan.finalize
    assert len(steps) == 4                                     # the model clock's stream: first, urgent x2, final


def _burst(n_streams: int, predict: bool, n_tokens: int = 150, rate: float = 1e-4):
    """`n_streams` text chunks arrive together at a replica whose earlier steps were light (one stream, 50 ms), on
    a model clock: T3 makes a token per stream every 3 ms + 0.1 ms a stream (first block: the first step + 3
    look-ahead, then blocks of 16); a step takes 45 ms + `rate` a flow token (new tokens + 150 prompt tokens for a
    first step, + 60 for a later one). -> (streams whose listener waited, time to first audio of each)."""
    policy = VocodePolicy(min_step_tokens=16, low_water_s=1.0, deadline_steps=True, first_step_cover=1.5,
                          first_step_predict=predict)
    sched = VocodeScheduler(policy, SR)
    sched.observe_step(0.045, 70)                                # the lighter load before the burst:
    for _ in range(5):                                           # steps of 45 ms + rate a flow token
        sched.observe_step(0.045 + rate * 1200, 1200)
    warm = _stream("warm")
    sched.observe_block(warm, 16, 0.0)
    sched.observe_block(warm, 16, 0.048)                         # T3: 3 ms a token
    t3_s = 0.003 + 0.0001 * n_streams
    streams, blocks = [], []
    for i in range(n_streams):
        first = sched.first_step_tokens(15, 16)
        s = _stream(f"s{i}", first_step_tokens=first, step_tokens=50)
        sched.add(s)
        streams.append(s)
        made, at, size = 0, 0.03, first + LOOKAHEAD_TOKENS
        while made < n_tokens:
            k = min(size, n_tokens - made)
            made, at, size = made + k, at + k * t3_s, 16
            blocks.append((at, i, k, made >= n_tokens))
    blocks.sort()
    now, waited, started = 0.0, set(), {}
    while not all(s.done for s in streams):
        while blocks and blocks[0][0] <= now:
            at, i, k, last = blocks.pop(0)
            streams[i].tokens += [1] * k
            streams[i].t3_finished = last
            sched.observe_block(streams[i], k, at)
        plans = sched.take_ready(now)
        if plans:
            cost = sum(p.num_new + (150 if p.stream.num_steps == 0 else 60) for p in plans)
            seconds = 0.045 + rate * cost
            for s in streams:
                if s.first_audio_at is not None and not s.done and s.seconds_left(now + seconds, SR) < 0:
                    waited.add(s.request_id)
            sched.observe_step(seconds, sched.step_cost(plans))
            now += seconds
            for p in plans:
                first = p.stream.num_steps == 0
                held = 0 if p.finalize else 4
                sched.finish_step(p, (p.num_new - held + (0 if first else 4)) * 960, now)
                if first:
                    started[p.stream.request_id] = now
            continue
        wake = [blocks[0][0]] if blocks else []
        if (w := sched.next_wakeup(now)) is not None:
            wake.append(now + max(w, 1e-4))
        now = min(wake) if wake else now + 0.01
    return waited, started


def test_first_step_predict_sizes_a_bursts_first_steps_for_the_load_that_arrived():
    """A burst of 64 streams on a replica that had one stream: first steps sized from the light steps before it
    (first_step_cover alone) leave most listeners waiting after their first audio, as the served runs' opening
    waves did (bench/README.md); sized for the predicted steps of 64 streams, few wait, for later first audio."""
    before, ttfa_before = _burst(64, predict=False)
    after, ttfa_after = _burst(64, predict=True)
    assert len(before) > 32 and len(after) <= len(before) // 4, (len(before), len(after))
    assert max(ttfa_after.values()) > max(ttfa_before.values())           # the price: later first audio
    # one stream: nothing to predict beyond the light steps
    assert _burst(1, predict=True) == _burst(1, predict=False)


def test_predicted_step_seconds_grows_with_streams_and_holds_when_overloaded():
    sched = VocodeScheduler(VocodePolicy(row_overhead_tokens=60), SR)
    assert sched.predicted_step_seconds(8) is None                      # nothing observed
    sched.observe_step(0.05, 90)                                        # the fixed part: 50 ms
    sched.observe_step(0.052, 100)                                      # barely above it: says nothing of a token
    assert sched.predicted_step_seconds(8) is None
    sched.observe_step(0.15, 1000)                                      # 0.1 ms a flow token above 50 ms
    assert sched.predicted_step_seconds(32) == pytest.approx((0.05 + 1e-4 * 32 * 60) / (1 - 1e-4 * 32 * 25))
    assert sched.predicted_step_seconds(64) > 2 * sched.predicted_step_seconds(32) - 0.05
    assert sched.predicted_step_seconds(1000) == pytest.approx((0.05 + 1e-4 * 1000 * 60) / 0.2)
    assert sched.predicted_first_step(64) == 0                           # first_step_predict off


def _observed(policy: VocodePolicy, t3_seconds_per_token: float) -> VocodeScheduler:
    """A scheduler that has seen a light step (45 ms), a loaded one (+0.13 ms a flow token) and T3's pace."""
    sched = VocodeScheduler(policy, SR)
    sched.observe_step(0.045, 70)
    sched.observe_step(0.045 + 1.3e-4 * 2000, 2000)
    warm = _stream("warm")
    sched.observe_block(warm, 16, 0.0)
    sched.observe_block(warm, 16, 16 * t3_seconds_per_token)
    return sched


def test_first_step_predict_counts_only_the_streams_before_their_first_step():
    """In a steady state many streams are open but few have not stepped yet: the prediction is for those few
    (the observed steps already size first steps there); in a burst, for all of them."""
    sched = _observed(VocodePolicy(first_step_cover=1.5, first_step_predict=True, max_first_step_tokens=50),
                      t3_seconds_per_token=0.009)
    for i in range(60):                                                # 60 streams past their first step
        s = _stream(f"old{i}")
        s.num_steps = 1
        sched.add(s)
    steady = sched.first_step_tokens(15, 16)
    assert steady == max(15, min(50, sched._cover_tokens(sched.step_seconds)))   # the observed steps rule
    for i in range(60):                                                # a burst: 60 before their first step
        sched.add(_stream(f"new{i}", first_step_tokens=15))
    assert sched.first_step_tokens(15, 16) == 50 > steady
    s = sched.streams["new0"]
    s.tokens.extend(range(15 + LOOKAHEAD_TOKENS))
    assert sched.ready_reason(s, 0.0) is None                          # held until its audio covers the burst
    s.tokens.extend(range(35))
    assert sched.ready_reason(s, 0.0) == "first"


def test_first_step_predict_does_not_hold_an_idle_replicas_light_first_step():
    """The served run with first_step_predict gave one stream 24-token first steps instead of the light 8 (first
    audio p50 0.171 against 0.110 s, bench/results/bench_system_predict_urgent3.md): the burst hold must not apply
    to a stream whose first step was sized for an idle replica."""
    sched = _observed(VocodePolicy(first_step_cover=1.5, first_step_predict=True, light_first_step_tokens=8),
                      t3_seconds_per_token=0.004)
    first = sched.first_step_tokens(15, 16)
    assert first == 8 < sched.predicted_first_step(1)                  # idle: light, though a prediction exists
    s = _stream("alone", first_step_tokens=first, light_first_step=first < 15)
    sched.add(s)
    s.tokens.extend(range(8 + LOOKAHEAD_TOKENS))
    assert sched.ready_reason(s, 0.0) == "first"
    held = _stream("held", first_step_tokens=8)                        # the same stream not marked light waits
    sched.add(held)
    held.tokens.extend(range(8 + LOOKAHEAD_TOKENS))
    assert sched.ready_reason(held, 0.0) is None
