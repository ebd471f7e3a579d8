"""`chatterbox-serve plan`: GPU fractions per stage from the memory estimator (quant/estimator.py).

Each stage's replica is estimated on its own (its components, their quantization, its batch), including the
~0.75 GiB CUDA context every Ray replica pays; the fraction to ask Ray for is that over the card's memory,
rounded up to 0.05. Ray packs by these fractions, and each replica caps its allocator to its share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from quant.estimator import GiB, MiB, estimate_replica
from quant.strategies import AUTO_ORDER, named_strategy

STAGE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "t3": ("t3", "t3_extra"),
    "s3gen": ("s3gen_flow_encoder", "s3gen_flow_decoder", "hift"),
    "voice": ("s3_tokenizer", "campplus", "voice_encoder"),
}


@dataclass(frozen=True)
class StagePlan:
    stage: str
    estimate_bytes: int
    num_gpus: float          # fraction to request
    max_per_gpu: int         # replicas of this stage alone that fit on one card


def plan_stages(gpu_memory_gib: float, strategy: str = "auto", concurrency: int = 32,
                s3gen_batch: int = 16, voice_batch: int = 1) -> tuple[str, list[StagePlan]]:
    """(strategy used, a plan per stage). `auto` takes the least aggressive strategy whose three stages fit."""
    if strategy != "auto":
        return strategy, _plan(named_strategy(strategy, "cuda"), gpu_memory_gib, concurrency, s3gen_batch, voice_batch)
    for name in AUTO_ORDER:
        plans = _plan(named_strategy(name, "cuda"), gpu_memory_gib, concurrency, s3gen_batch, voice_batch)
        if sum(p.num_gpus for p in plans) <= 1.0:
            return name, plans
    return AUTO_ORDER[-1], plans


def _plan(specs, gpu_memory_gib: float, concurrency: int, s3gen_batch: int, voice_batch: int) -> list[StagePlan]:
    gpu_bytes = int(gpu_memory_gib * GiB)
    plans = []
    for stage, keys in STAGE_COMPONENTS.items():
        n = {"t3": concurrency, "s3gen": s3gen_batch, "voice": voice_batch}[stage]
        est = estimate_replica({k: specs[k] for k in keys}, num_requests=n)
        frac = min(1.0, math.ceil(est.total_bytes / gpu_bytes * 20) / 20)
        plans.append(StagePlan(stage, est.total_bytes, frac, max(0, int(1 // frac)) if frac else 0))
    return plans


def print_plan(gpu_memory_gib: float, strategy: str = "auto", concurrency: int = 32) -> None:
    import typer

    used, plans = plan_stages(gpu_memory_gib, strategy, concurrency)
    typer.echo(f"one GPU of {gpu_memory_gib:g} GiB, quantization {used!r}{' (auto)' if strategy == 'auto' else ''}, "
               f"{concurrency} concurrent T3 requests")
    typer.echo(f"{'stage':<8}{'estimate MiB':>14}{'num_gpus':>10}{'alone/GPU':>11}")
    for p in plans:
        typer.echo(f"{p.stage:<8}{p.estimate_bytes / MiB:>14.0f}{p.num_gpus:>10.2f}{p.max_per_gpu:>11d}")
    total = sum(p.num_gpus for p in plans)
    fits = "fits" if total <= 1.0 else "does NOT fit"
    typer.echo(f"one replica of each stage: {total:.2f} of the GPU ({fits}); put these num_gpus in deploy/*.yaml")


def t3_slots_that_fit(budget_bytes: int, specs: dict, *, preset: str = "full", seq_len: int = 1536,
                      upper: int = 256, headroom: float = 0.9) -> int:
    """The most T3 KV slots (requests decoded together) whose estimated replica (weights, KV cache of
    `seq_len` positions per slot, activations, CUDA context) fits in `headroom` of `budget_bytes`; at least 1."""
    specs = {k: v for k, v in specs.items() if k in STAGE_COMPONENTS["t3"]}
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        est = estimate_replica(specs, preset=preset, num_requests=mid, seq_len=seq_len)
        if est.total_bytes <= headroom * budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
