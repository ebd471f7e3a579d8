"""Where the S3Gen engine's first streamed chunk spends its time (a diagnostic, not a benchmark).

    python -m bench.profile_first_chunk --checkpoint /tmp/chatterbox-full --out $OUT [--compile]

Warms the first-chunk shape up (CUDA graphs captured), then profiles one `vocode_stream_step` with
torch.profiler (CPU + CUDA) and writes the op tables (by self CPU time and by CUDA time), the kernel count and
the summed kernel time against the wall time to <out>/profile_first_chunk[_compile].txt.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_s3gen import load_model, requests
from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--preset", default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--stream-chunk", type=int, default=25)
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--compile", action="store_true", help="estimator compiled (dynamic shapes)")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    base, gen, _ = load_model(a)
    eng = S3GenEngine(base, S3GenEngineConfig(device=a.device, dtype=a.dtype, compile=a.compile))
    tok = requests(a, 1, gen)[0].speech_tokens[:a.stream_chunk]
    step = lambda: eng.vocode_stream_step(tok, gen, None, finalize=False, seed=0)  # noqa: E731
    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    gaps = [(kernels[i + 1].time_range.start - kernels[i].time_range.end, kernels[i].name, kernels[i + 1].name)
            for i in range(len(kernels) - 1)]
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start if kernels else 0
    cpu0 = min(e.time_range.start for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU)
    lines = [f"first chunk ({a.stream_chunk} tokens, {a.dtype}, compile={a.compile}): median {1e3 * statistics.median(times):.1f} ms "
             f"of wall time; one profiled step: {len(kernels)} CUDA kernels, {sum(e.device_time for e in kernels) / 1e3:.2f} ms "
             "of summed kernel time",
             f"GPU timeline: first to last kernel {span / 1e3:.2f} ms, kernels busy {busy / 1e3:.2f} ms, idle gaps "
             f"{sum(g for g, _, _ in gaps if g > 0) / 1e3:.2f} ms ({sum(g for g, _, _ in gaps if g > 20) / 1e3:.2f} ms in "
             f"gaps > 20 us); the first kernel starts {(kernels[0].time_range.start - cpu0) / 1e3:.2f} ms after the "
             "step's first host op", "largest gaps (us, kernel before -> after):",
             *(f"  {g:8.1f}  {a[:70]} -> {b[:70]}" for g, a, b in sorted(gaps, reverse=True)[:12]),
             "", "by self CPU time:",
             prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), "", "by CUDA time:",
             prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_first_chunk{'_compile' if a.compile else ''}.txt"
    path.write_text("\n".join(lines) + "\n")
    print(lines[0])


if __name__ == "__main__":
    main()
