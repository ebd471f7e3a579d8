"""The S3Gen replica's vocoder scheduling on a model clock: the real `S3GenReplica` (scheduler, T3 feed, audio
blocks) over a fake T3 and a fake engine with the served H200's timings, closed-loop streams of the bench's text
lengths. A model, not a measurement: it compares scheduler policies where a GPU run is not at hand.

    python -m bench.sim_scheduler            # -> bench/results/sim_scheduler.{json,md}

The clock: T3 sends the T3 backend's blocks (first block, then `t3_block_tokens`) at 3.9 ms a token (served at one
stream: 97.8 T3 GPU-ms per second of audio, bench/results/bench_system_prompt50.md); a step takes 45 ms + 0.27 ms a
new token (bench/results/s3gen_step_fit.md) and holds back 4 tokens of audio for the join, as the engine does. At
one stream it reproduces the served run's steps (4.5 a chunk; `bench_system_prompt50_steps.log`); it does not model
T3 slowing down as its batch grows, nor the GPU shared with T3, so it says little above a few streams.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.versions import versions  # noqa: E402
from serve_app.contracts import (SAMPLE_RATE, SAMPLES_PER_TOKEN, SpeechJob, SynthesisParams,  # noqa: E402
                                 TokenChunk)
from serve_app.serving.config import S3GenSettings  # noqa: E402
from serve_app.serving.stages.s3gen_stage import S3GenReplica  # noqa: E402

T3_SECONDS_PER_TOKEN = 0.0039
STEP_FIXED_S, STEP_PER_TOKEN_S = 0.045, 0.00027
HOLD_TOKENS = 4            # the engine's 8 overlap frames
LOOKAHEAD = 3              # the flow's look-ahead, held until T3 is done
# gpu-1x.yaml's S3Gen user_config (the scheduler's part)
# deploy/gpu-1x.yaml's S3Gen user_config when the clock was fit (8ba91dc), before urgent_steps and first_step_predict
SERVED_POLICY = {"min_step_tokens": 16, "deadline_steps": True, "light_first_step_tokens": 8, "first_step_cover": 1.5}
# token caps of a sample of bench/system/texts.py's texts (2 s + 0.07 s a character)
CHUNK_TOKENS = (61, 71, 94, 115, 152, 206, 222, 269)
RESULTS = Path(__file__).resolve().parent / "results"


class BlockT3:
    """T3's blocks for a text chunk of `tokens_for(job)` tokens at T3_SECONDS_PER_TOKEN."""

    def __init__(self, tokens_for=lambda job: int(job.text)):
        self.tokens_for = tokens_for

    async def generate(self, job):
        n, made, want = self.tokens_for(job), 0, job.first_block_tokens
        while made < n:
            k = min(want, n - made)
            await asyncio.sleep(k * T3_SECONDS_PER_TOKEN)
            made += k
            yield TokenChunk(job.request_id, list(range(made - k, made)),
                             timings=dict(t3_first_token=0.01, t3_first_block=0.0) if made == k else None)
            want = job.block_tokens
        yield TokenChunk(job.request_id, [], finished=True, finish_reason="stop")


class TimedBackend:
    """Silence for the vocoded tokens, less the look-ahead and the join's hold; a step takes STEP_FIXED_S +
    STEP_PER_TOKEN_S a new token."""

    name = "timed"

    def prepare_conds(self, conds):
        return conds

    def new_stream_state(self) -> dict:
        return {"vocoded": 0, "out": 0}

    def vocode_batch(self, items):
        out, new = self.outputs(items)
        time.sleep(STEP_FIXED_S + STEP_PER_TOKEN_S * new)
        return out

    @staticmethod
    def outputs(items) -> tuple[list, int]:
        """-> (per item (audio, state), new tokens vocoded): the step's results, without its time."""
        new, out = 0, []
        for it in items:
            upto = len(it.tokens) - (0 if it.finalize else LOOKAHEAD)
            new += upto - it.state["vocoded"]
            audible = upto if it.finalize else max(0, upto - HOLD_TOKENS)
            n = max(0, audible - it.state["out"]) * SAMPLES_PER_TOKEN
            out.append((np.zeros(n, np.float32), {"vocoded": upto, "out": max(audible, it.state["out"])}))
        return out, new


class _Conds:
    class _Get:
        async def remote(self, voice_id):
            return ("conds", voice_id)

    get_conds = _Get()


def replica(user_config: dict, t3=None) -> S3GenReplica:
    settings = S3GenSettings.model_validate({"user_config": {**SERVED_POLICY, **user_config}})
    return S3GenReplica(None, _Conds(), settings, backend=TimedBackend(), t3_handle=t3 or BlockT3())


def job(request_id: str, num_tokens: int) -> SpeechJob:
    """A streamed text chunk as the router sends it (the text is the fake T3's token count)."""
    return SpeechJob(request_id=request_id, text=str(num_tokens), voice_id="default",
                     params=SynthesisParams(max_new_tokens=1000), streaming=True, first_step_tokens=15,
                     step_tokens=50, t3_block_tokens=16)


async def stream(rep: S3GenReplica, j: SpeechJob) -> dict:
    """One chunk through the replica: its audio blocks, how late the latest came for a listener starting at the
    first, and its time to first audio."""
    sent, first, played, late, blocks = time.monotonic(), None, 0.0, 0.0, 0
    async for block in rep.synthesize(j):
        blocks += 1
        if block.audio.size:
            now = time.monotonic()
            first = now if first is None else first
            late = max(late, now - first - played)
            played += block.audio.size / SAMPLE_RATE
    return {"blocks": blocks, "late_s": late, "ttfa_s": first - sent, "audio_s": played}


async def closed_loop(concurrency: int, duration_s: float, user_config: dict, seed: int = 1) -> dict:
    rep, rng, out = replica(user_config), random.Random(seed), []
    end = time.monotonic() + duration_s

    async def client(c: int) -> None:
        i = 0
        while time.monotonic() < end:
            out.append(await stream(rep, job(f"c{c}-{i}.sim-0", rng.choice(CHUNK_TOKENS))))
            i += 1

    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return {"concurrency": concurrency, "user_config": user_config, "chunks": len(out),
            "stalled": sum(1 for r in out if r["late_s"] > 0.05),
            "steps_per_chunk": sum(r["blocks"] for r in out) / len(out),
            "ttfa_p50_s": statistics.median(r["ttfa_s"] for r in out),
            "audio_s_per_s": sum(r["audio_s"] for r in out) / duration_s}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,4,8,16")
    p.add_argument("--duration-s", type=float, default=8.0)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    policies = [{}, {"urgent_steps": 3.0}]
    rows = []
    for c in (int(x) for x in a.levels.split(",")):
        for pol in policies:
            r = asyncio.run(closed_loop(c, a.duration_s, pol))
            print(json.dumps(r), flush=True)
            rows.append(r)
    report = {"benchmark": "sim_scheduler", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": "CPU, model clock (no GPU)", "versions": versions("ray", "numpy"),
              "clock": {"t3_seconds_per_token": T3_SECONDS_PER_TOKEN, "step_fixed_s": STEP_FIXED_S,
                        "step_per_token_s": STEP_PER_TOKEN_S, "hold_tokens": HOLD_TOKENS},
              "served_policy": SERVED_POLICY, "chunk_tokens": CHUNK_TOKENS, "duration_s": a.duration_s,
              "levels": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_scheduler.json").write_text(json.dumps(report, indent=1))
    lines = ["# S3Gen scheduler on a model clock (`bench/sim_scheduler.py`)", "",
             f"{report['created']}; {report['device']}; clock {report['clock']}; policy {SERVED_POLICY} plus the "
             f"column's; closed-loop streams of {list(CHUNK_TOKENS)} tokens, {a.duration_s:g} s a level. A model, "
             "not a measurement.", "",
             "| streams | policy | chunks | stalled (> 50 ms late) | steps a chunk | TTFA p50 s | audio s/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['user_config'] or 'served'} | {r['chunks']} | {r['stalled']} | "
              f"{r['steps_per_chunk']:.2f} | {r['ttfa_p50_s']:.3f} | {r['audio_s_per_s']:.1f} |" for r in rows]
    (out / "sim_scheduler.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'sim_scheduler.md'}")


if __name__ == "__main__":
    main()
