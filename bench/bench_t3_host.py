"""Host work of the T3 stage around its engine: the step thread and the replica's event loop, without a GPU.

    python -m bench.bench_t3_host                      # streams 1, 16, 64; device steps of 3 ms
    python -m bench.bench_t3_host --step-ms 10 --streams 64

`EngineT3Backend` runs a stand-in engine whose step sleeps `--step-ms` with the GIL released (a step's graph
replay and its one device sync) and gives every running request one token; each request's blocks are consumed on
the event loop, as `T3Replica.generate` does. Two ways in the same run: tokens handed to the event loop
in the stage's blocks (18, then 16: the service's first block and later ones) and in blocks of one token (every
step wakes every request's consumer: what the backend did before it filled blocks itself). Per way: steps per
second against the ideal 1000 / step-ms, the step loop's period beyond the device step (ms), the hand-offs to the
event loop per step, and the process's CPU time per 1,000 tokens. Python threads share one GIL: event-loop work
per step delays the step thread as well.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.contracts import T3Job  # noqa: E402
from serve_app.serving.stages import t3_backend  # noqa: E402
from serve_app.serving.stages.t3_backend import EngineT3Backend  # noqa: E402

WAYS = {"blocks": (18, 16), "per-step": (1, 1)}


class SleepEngine:
    """T3Engine's contract; a step sleeps `step_s` (GIL released, as a device sync) and yields one token each."""

    def __init__(self, step_s: float, tokens: int):
        from serve_app.engine.t3.request import T3StepOutput

        self._out = T3StepOutput
        self.step_s, self.tokens = step_s, tokens
        self.active: dict[str, int] = {}
        self.step_times: list[float] = []

    def add_request(self, req) -> None:
        self.active[req.request_id] = 0

    def cancel(self, request_id: str) -> None:
        self.active.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.active)

    def step(self):
        t0 = time.perf_counter()
        time.sleep(self.step_s)
        out = []
        for rid in list(self.active):
            self.active[rid] += 1
            done = self.active[rid] >= self.tokens
            out.append(self._out(rid, [self.active[rid] % 6000], done, "length" if done else None))
            if done:
                del self.active[rid]
        self.step_times.append(time.perf_counter() - t0)
        return out


class _Tokenizer:
    def text_to_tokens(self, text):
        import torch

        return torch.tensor([[5, 6, 7]])


def run_way(streams: int, step_ms: float, tokens: int, way: str) -> dict:
    first, later = WAYS[way]
    engine = SleepEngine(step_ms / 1e3, tokens)
    loop_steps: list[float] = []
    handoffs = [0]
    put_all = t3_backend._put_all

    def counting_put_all(items):
        handoffs[0] += 1
        put_all(items)

    def on_step(seconds: float, batch: int) -> None:
        loop_steps.append(seconds)

    t3_backend._put_all = counting_put_all
    backend = EngineT3Backend(engine, _Tokenizer(), on_step=on_step)
    conds = backend.prepare_conds(_conds())

    async def one(i: int) -> int:
        job = T3Job(f"{way}-{i}", "Hi.", "default", first_block_tokens=first, block_tokens=later)
        n = 0
        async for chunk in backend.generate(job, conds, time.monotonic()):
            n += len(chunk.tokens)
        return n

    async def main() -> int:
        return sum(await asyncio.gather(*(one(i) for i in range(streams))))

    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        made = asyncio.run(main())
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        backend.close()
        t3_backend._put_all = put_all
    steps = len(loop_steps)
    return {"way": way, "streams": streams, "first_block_tokens": first, "block_tokens": later,
            "tokens": made, "steps": steps, "wall_s": wall, "steps_per_s": steps / wall,
            "ideal_steps_per_s": 1e3 / step_ms,
            # a step's period less its (over)sleep: the host's own work per step, GIL waits included
            "loop_ms_beyond_device_step": 1e3 * (wall / max(1, steps) - statistics.mean(engine.step_times)),
            "handoffs_per_step": handoffs[0] / max(1, steps), "cpu_ms_per_1k_tokens": 1e6 * cpu / max(1, made)}


def _conds():
    import numpy as np

    from serve_app.contracts import VoiceConds

    return VoiceConds(t3_speaker_emb=np.zeros((1, 256), np.float32),
                      t3_cond_prompt_speech_tokens=np.zeros((1, 150), np.int64), t3_emotion_adv=0.5,
                      gen_prompt_token=np.zeros((1, 1), np.int64), gen_prompt_token_len=np.ones(1, np.int64),
                      gen_prompt_feat=np.zeros((1, 2, 80), np.float32), gen_embedding=np.zeros((1, 192), np.float32))


def to_markdown(report: dict) -> str:
    lines = [f"# T3 stage host work ({report['timestamp']})", "",
             f"host: {report['host']}; python {report['python']}; device step {report['step_ms']} ms "
             f"(a sleep with the GIL released); {report['tokens']} tokens per request", "",
             "| streams | way | steps/s (ideal) | step loop beyond the device step, ms (mean) | event-loop hand-offs "
             "per step | CPU ms per 1k tokens |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['streams']} | {r['way']} ({r['first_block_tokens']}/{r['block_tokens']}) | "
                     f"{r['steps_per_s']:.0f} ({r['ideal_steps_per_s']:.0f}) | {r['loop_ms_beyond_device_step']:.3f} | "
                     f"{r['handoffs_per_step']:.2f} | {r['cpu_ms_per_1k_tokens']:.1f} |")
    lines += ["", "per-step: blocks of one token, every step wakes every request's consumer (the backend before it "
              "filled the stage's blocks itself); blocks: the service's sizes."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="1,16,64", help="comma list of concurrent requests")
    p.add_argument("--step-ms", type=float, default=3.0, help="the stand-in device step")
    p.add_argument("--tokens", type=int, default=200, help="tokens per request")
    p.add_argument("--out", default="bench/results", help="output directory")
    a = p.parse_args(argv)
    report = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": platform.processor() or platform.machine(), "python": platform.python_version(),
              "step_ms": a.step_ms, "tokens": a.tokens, "results": []}
    for streams in (int(s) for s in a.streams.split(",")):
        for way in WAYS:
            r = run_way(streams, a.step_ms, a.tokens, way)
            print(json.dumps(r))
            report["results"].append(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_t3_host.json").write_text(json.dumps(report, indent=2))
    (out / "bench_t3_host.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
