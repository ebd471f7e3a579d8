"""The S3Gen replica's young lane: the real `S3GenReplica` (scheduler, both step loops, T3 feed) over
`bench/sim_scheduler.py`'s fake T3 (blocks at 3.9 ms a token) and a fake engine whose main-lane steps are long
(a loaded replica's) and whose young-lane steps are short."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bench.sim_scheduler import BlockT3, TimedBackend, _Conds, job, stream
from serve_app.serving.config import S3GenSettings
from serve_app.serving.stages.s3gen_stage import S3GenReplica

pytestmark = pytest.mark.anyio

MAIN_STEP_S, YOUNG_STEP_S = 1.0, 0.02


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
