"""The S3Gen replica's steps for one stream at light load, on a clock like the served H200's: the real
`S3GenReplica` (vocoder scheduler, T3 feed) over a fake T3 that sends the T3 backend's blocks (first block, then
`t3_block_tokens`) at 3.9 ms a token (served at one stream: 97.8 T3 GPU-ms per second of audio,
bench/results/bench_system_prompt50.md) and a backend whose steps take 45 ms + 0.27 ms a new token and hold back 4
tokens of audio for the join, as the engine does (bench/results/s3gen_step_fit.md)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from router_fakes import _CondsHandle
from serve_app.contracts import SAMPLE_RATE, SAMPLES_PER_TOKEN, SpeechJob, SynthesisParams, TokenChunk
from serve_app.serving.config import S3GenSettings
from serve_app.serving.stages.s3gen_stage import S3GenReplica

pytestmark = pytest.mark.anyio
T3_SECONDS_PER_TOKEN = 0.0039
HOLD_TOKENS = 4            # the engine's 8 overlap frames
LOOKAHEAD = 3


@pytest.fixture
def anyio_backend():
    return "asyncio"


class BlockT3:
    """T3's blocks for one chunk of `n` tokens at a steady pace."""

    def __init__(self, n: int):
        self.n = n

    async def generate(self, job):
        made, want = 0, job.first_block_tokens
        while made < self.n:
            k = min(want, self.n - made)
            await asyncio.sleep(k * T3_SECONDS_PER_TOKEN)
            made += k
            yield TokenChunk(job.request_id, list(range(made - k, made)),
                             timings=dict(t3_first_token=0.01, t3_first_block=0.0) if made == k else None)
            want = job.block_tokens
        yield TokenChunk(job.request_id, [], finished=True, finish_reason="stop")


class TimedBackend:
    """Audio of silence for the vocoded tokens, less the look-ahead and the join's hold; steps of 45 ms + 0.27 ms a
    new token."""

    name = "timed"

    def prepare_conds(self, conds):
        return conds

    def new_stream_state(self) -> dict:
        return {"vocoded": 0, "out": 0}

    def vocode_batch(self, items):
        new, out = 0, []
        for it in items:
            upto = len(it.tokens) - (0 if it.finalize else LOOKAHEAD)
            new += upto - it.state["vocoded"]
            audible = upto if it.finalize else max(0, upto - HOLD_TOKENS)
            n = max(0, audible - it.state["out"]) * SAMPLES_PER_TOKEN
            out.append((np.zeros(n, np.float32), {"vocoded": upto, "out": max(audible, it.state["out"])}))
        time.sleep(0.045 + 0.00027 * new)
        return out


async def _one_stream(n_tokens: int, **user_config) -> tuple[int, float]:
    """-> (the chunk's steps, how late its latest block came for a listener starting at the first, s)."""
    settings = S3GenSettings.model_validate({"user_config": {
        "min_step_tokens": 16, "deadline_steps": True, "light_first_step_tokens": 8, "first_step_cover": 1.5,
        **user_config}})
    replica = S3GenReplica(None, _CondsHandle(), settings, backend=TimedBackend(), t3_handle=BlockT3(n_tokens))
    steps, late = [], 0.0
    for r in range(2):   # the second stream sees the first one's observed step and T3 pace
        job = SpeechJob(request_id=f"r{r}.run-0", text="x", voice_id="default",
                        params=SynthesisParams(max_new_tokens=1000), streaming=True, first_step_tokens=15,
                        step_tokens=50, t3_block_tokens=16)
        first, played, blocks = None, 0.0, 0
        async for block in replica.synthesize(job):
            blocks += 1
            if block.audio.size:
                now = time.monotonic()
                first = now if first is None else first
                late = max(late, now - first - played)
                played += block.audio.size / SAMPLE_RATE
        assert played == pytest.approx(n_tokens * SAMPLES_PER_TOKEN / SAMPLE_RATE)
        steps.append(blocks)
    return steps[-1], late


async def test_urgent_steps_vocodes_a_light_load_chunk_in_fewer_steps_and_in_time():
    """Without it, a chunk whose first step handed out 0.16 s of audio takes two 16-token urgent steps (each
    re-runs context and look-ahead) and an 80-token one before the last, as the served run's step traces show
    (bench/results/bench_system_prompt50_steps.log: `8:first 16:urgent 16:urgent 80:urgent ...`); with
    `urgent_steps=3` it waits until its audio lasts three steps, then takes everything T3 made: three steps."""
    before, late_before = await _one_stream(135)
    after, late_after = await _one_stream(135, urgent_steps=3.0)
    assert before >= 5 and after == 3, (before, after)
    assert late_after < 0.02 and late_before < 0.02, (late_before, late_after)   # no listener waits
    # urgent_margin=2.0, measured on the H200 to change nothing: at this T3 pace the 100-token target is too far
    margin, _ = await _one_stream(135, urgent_margin=2.0)
    assert margin == before
