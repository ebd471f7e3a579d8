"""The S3Gen replica's steps for one stream at light load, on the served H200's clock: the real `S3GenReplica`
(vocoder scheduler, T3 feed) over `bench/sim_scheduler.py`'s fake T3 (the T3 backend's blocks at 3.9 ms a token)
and fake engine (steps of 45 ms + 0.27 ms a new token, 4 tokens of audio held for the join)."""
from __future__ import annotations

import asyncio

import pytest

from bench.sim_scheduler import BlockT3, closed_loop, job, replica, stream
from serve_app.contracts import SAMPLE_RATE, SAMPLES_PER_TOKEN

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _one_stream(n_tokens: int, **user_config) -> dict:
    """The second of two chunks in turn (it sees the first one's steps and T3 pace)."""
    rep = replica(user_config, BlockT3(lambda j: n_tokens))
    for r in range(2):
        out = await stream(rep, job(f"r{r}.run-0", n_tokens))
        assert out["audio_s"] == pytest.approx(n_tokens * SAMPLES_PER_TOKEN / SAMPLE_RATE)
    return out


async def test_urgent_steps_vocodes_a_light_load_chunk_in_fewer_steps_and_in_time():
    """Without it, a chunk whose first step handed out 0.16 s of audio takes two 16-token urgent steps (each
    re-runs context and look-ahead) and an 80-token one before the last, as the served run's step traces show
    (bench/results/bench_system_prompt50_steps.log: `8:first 16:urgent 16:urgent 80:urgent ...`); with
    `urgent_steps=3` it waits until its audio lasts three of the longest recent steps, then takes everything T3
    made: three steps."""
    before = await _one_stream(135)
    after = await _one_stream(135, urgent_steps=3.0)
    assert before["blocks"] >= 5 and after["blocks"] == 3, (before, after)
    assert before["late_s"] < 0.02 and after["late_s"] < 0.02, (before, after)   # no listener waits


def test_urgent_steps_keeps_streams_in_time_under_load():
    """24 closed-loop streams: steps are long, and low_water_s rules as before: no chunk more than 50 ms late."""
    for user_config in ({}, {"urgent_steps": 3.0}):
        r = asyncio.run(closed_loop(24, 4.0, user_config))
        assert r["chunks"] > 40 and r["stalled"] == 0, r
