"""When a stream's audio leaves the S3Gen replica, against a long step: per-call delivery (`s3gen.deliver_per_call`).
The real `S3GenReplica` (scheduler, step loop, T3 feed, audio blocks) over `bench/sim_scheduler.py`'s fake T3
(blocks at 3.9 ms a token) and a fake engine whose step is a short flow call, then a long one."""
from __future__ import annotations

import asyncio
import time

import pytest

from bench.sim_scheduler import BlockT3, TimedBackend, _Conds, job, stream
from serve_app.serving.config import S3GenSettings
from serve_app.serving.stages.s3gen_stage import S3GenReplica

pytestmark = pytest.mark.anyio

FIRST_CALL_S, REST_S = 0.05, 1.0          # a step of a short call, then a long one


@pytest.fixture
def anyio_backend():
    return "asyncio"


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
