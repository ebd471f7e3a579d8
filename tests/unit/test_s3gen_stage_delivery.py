"""When a stream's audio leaves the S3Gen replica, against a long step: the young lane (a second step loop for
streams' first steps, `s3gen.user_config.young_lane_steps`) and per-call delivery (`s3gen.deliver_per_call`). The
real `S3GenReplica` (scheduler, step loops, T3 feed, audio blocks) over `bench/sim_scheduler.py`'s fake T3 (blocks
at 3.9 ms a token) and fake engines with chosen step times."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bench.sim_scheduler import BlockT3, TimedBackend, _Conds, job, stream
from serve_app.serving.config import S3GenSettings
from serve_app.serving.stages.s3gen_stage import S3GenReplica

pytestmark = pytest.mark.anyio

MAIN_STEP_S, YOUNG_STEP_S = 1.0, 0.02     # the young lane's tests: a loaded main loop, a quick young lane
FIRST_CALL_S, REST_S = 0.05, 1.0          # per-call delivery's: a step of a short call, then a long one


@pytest.fixture
def anyio_backend():
    return "asyncio"


class LaneBackend(TimedBackend):
    """TimedBackend's audio, each step `step_s` long; `new_lane` gives the young lane's backend. Records which
    thread ran each step and whether two steps overlapped."""

    def __init__(self, step_s: float, log: list | None = None, lane: str = "main"):
        self.step_s, self.log, self.lane = step_s, [] if log is None else log, lane

    def vocode_batch(self, items):
        t0 = time.monotonic()
        out = super().vocode_batch(items)   # sleeps the model clock's step; the rest of step_s below
        time.sleep(max(0.0, self.step_s - (time.monotonic() - t0)))
        self.log.append((self.lane, threading.current_thread().name, t0, time.monotonic(), len(items)))
        return out

    def new_lane(self, batch_sizes=None):
        return LaneBackend(YOUNG_STEP_S, self.log, "young")


def _replica(young_lane_steps: int) -> tuple[S3GenReplica, list]:
    backend = LaneBackend(MAIN_STEP_S)
    settings = S3GenSettings.model_validate({"user_config": {"young_lane_steps": young_lane_steps}})
    return S3GenReplica(None, _Conds(), settings, backend=backend, t3_handle=BlockT3()), backend.log


async def _second_stream_ttfa(young_lane_steps: int) -> tuple[float, list, dict]:
    """A long stream A; once its main-lane step is running, stream B arrives: B's time to first audio."""
    rep, log = _replica(young_lane_steps)
    a = asyncio.create_task(stream(rep, job("a.run-0", 400)))
    while not any(lane == "main" for lane, *_ in log) and not a.done():
        await asyncio.sleep(0.01)      # A's first steps are done; a main step of A's is under way now
    await asyncio.sleep(0.1)
    b = await stream(rep, job("b.run-0", 60))
    await a
    return b["ttfa_s"], log, b


async def test_a_new_stream_gets_first_audio_beside_a_long_step():
    """With the young lane, B's first step runs while A's 1 s main step does: first audio in well under a main
    step (its T3 block of 18 tokens is ~70 ms, the young step 20 ms). With one loop, B waits for A's step and
    then its own: over a second."""
    ttfa, log, b = await _second_stream_ttfa(2)
    assert ttfa < 0.5, (ttfa, log)
    young = [e for e in log if e[0] == "young"]
    main = [e for e in log if e[0] == "main"]
    assert young and main and {e[1] for e in young}.isdisjoint({e[1] for e in main})   # two threads
    assert any(y[2] < m[3] and m[2] < y[3] for y in young for m in main)               # steps overlapped
    assert b["audio_s"] == pytest.approx(60 * 960 / 24_000)                            # all of B's audio
    one_ttfa, one_log, _ = await _second_stream_ttfa(0)
    assert one_ttfa > MAIN_STEP_S and all(e[0] == "main" for e in one_log), (one_ttfa, one_log)


def test_young_lane_steps_without_a_lane_backend_runs_one_loop():
    """A backend that cannot run two steps at once (no new_lane) keeps one loop; the policy says so."""
    settings = S3GenSettings.model_validate({"user_config": {"young_lane_steps": 2}})
    rep = S3GenReplica(None, _Conds(), settings, backend=TimedBackend(), t3_handle=BlockT3())
    assert list(rep._lanes) == ["main"] and rep.scheduler.policy.young_lane_steps == 0


class TwoCallBackend(TimedBackend):
    """TimedBackend's audio; a step's first item is one call of FIRST_CALL_S, the rest one of REST_S."""

    def __init__(self):
        self.steps: list[int] = []

    def vocode_batch(self, items):
        self.steps.append(len(items))
        time.sleep(FIRST_CALL_S + (REST_S if len(items) > 1 else 0.0))
        return self.outputs(items)[0]

    def vocode_batch_groups(self, items):
        self.steps.append(len(items))
        out = self.outputs(items)[0]
        time.sleep(FIRST_CALL_S)
        yield [(0, out[0])]
        if len(items) > 1:
            time.sleep(REST_S)
            yield [(i, out[i]) for i in range(1, len(items))]


async def _first_audio(deliver_per_call: bool) -> tuple[list[float], list[int], list[dict]]:
    backend = TwoCallBackend()
    settings = S3GenSettings.model_validate({"deliver_per_call": deliver_per_call})
    rep = S3GenReplica(None, _Conds(), settings, backend=backend, t3_handle=BlockT3())
    outs = await asyncio.gather(*(stream(rep, job(f"s{i}.run-0", 40)) for i in range(3)))
    return sorted(o["ttfa_s"] for o in outs), backend.steps, outs


async def test_the_most_urgent_rows_audio_leaves_before_the_steps_other_calls():
    """Three new streams step together; with deliver_per_call the first row's audio is out after its own call,
    the others' after theirs. Without it all three wait for the whole step. All audio arrives either way."""
    ttfa, steps, outs = await _first_audio(True)
    assert steps[0] == 3, steps                     # one step of the three first steps
    assert ttfa[0] < 0.5 and ttfa[1] > REST_S, ttfa
    assert all(o["audio_s"] == pytest.approx(40 * 960 / 24_000) for o in outs)
    ttfa, steps, outs = await _first_audio(False)
    assert steps[0] == 3 and ttfa[0] > REST_S, (ttfa, steps)
    assert all(o["audio_s"] == pytest.approx(40 * 960 / 24_000) for o in outs)


class FailsAfterFirstCall(TwoCallBackend):
    """The first step's second call fails; later steps work."""

    def vocode_batch_groups(self, items):
        first = not self.steps
        gen = super().vocode_batch_groups(items)
        yield next(gen)
        if first and len(items) > 1:
            raise RuntimeError("CUDA error: the second call")
        yield from gen


async def test_a_call_that_fails_fails_only_the_rows_not_yet_handed_out():
    """The rows a failed step had already handed out keep their audio and go on; the others end with the stage's
    error (the router turns it into a clean error for their requests)."""
    from serve_app.serving.errors import StageError

    rep = S3GenReplica(None, _Conds(), S3GenSettings.model_validate({"deliver_per_call": True}),
                       backend=FailsAfterFirstCall(), t3_handle=BlockT3())
    outs = await asyncio.gather(*(stream(rep, job(f"s{i}.run-0", 40)) for i in range(3)), return_exceptions=True)
    failed = [o for o in outs if isinstance(o, BaseException)]
    ok = [o for o in outs if not isinstance(o, BaseException)]
    assert len(failed) == 2 and all(isinstance(e, StageError) and "second call" in str(e) for e in failed), outs
    assert len(ok) == 1 and ok[0]["audio_s"] == pytest.approx(40 * 960 / 24_000)
    assert len(rep.scheduler) == 0 and not rep._outputs      # nothing left behind
