"""A few minutes of sustained mixed load on the real app (bench/soak.py's load, bounded for CI): no 5xx and no
broken response, resident memory of every replica flat, caches within their bounds, queues back to empty.

The same load on a GPU, for longer and reporting VRAM over time, is `python -m bench.soak` (bench/README.md).
"""
from __future__ import annotations

import asyncio
import statistics

import pytest
from fault_tools import replica_pids, rss_bytes, stage_memory, wait_ready, wait_until
from serve_fixture import API_KEY

from bench.soak import SoakConfig, run_soak

pytestmark = pytest.mark.timeout(600)

DURATION_S = 150.0
CONCURRENCY = 3
SAMPLE_EVERY_S = 10.0
WARM_UP_S = 40.0              # allocator pools, caches and lazy imports fill during the first requests
MAX_RSS_GROWTH = 0.10         # after warm-up, the last samples' median is within 10% (+ 40 MiB) of the first's
RSS_SLACK_BYTES = 40 * 2**20
DEPLOYMENTS = ("T3Stage", "S3GenStage", "VoiceStage", "SpeechIngress")


def replica_rss() -> dict[str, int]:
    out = {}
    for deployment in DEPLOYMENTS:
        for replica, pid in replica_pids(deployment).items():
            out[f"{deployment}#{replica}"] = rss_bytes(pid)
    return out


@pytest.fixture(scope="module")
def report(serve_app_instance):
    with serve_app_instance.client() as http:
        wait_ready(http)
    config = SoakConfig(duration_s=DURATION_S, concurrency=CONCURRENCY, sample_every_s=SAMPLE_EVERY_S,
                        voices=("default", "alloy"), request_timeout_s=120.0, seed=13)
    result = asyncio.run(run_soak(serve_app_instance.base_url, API_KEY, config, rss_fn=replica_rss))
    print("\n" + result.to_markdown("CPU soak (tiny preset)"))
    return result


def test_soak_has_no_5xx_and_no_broken_response(report):
    assert len(report.requests) >= 20, report.summary()
    assert not [r for r in report.requests if r.status is not None and r.status >= 500], report.summary()
    failures = report.failures()
    assert not failures, [(f.kind, f.fmt, f.status, f.error) for f in failures[:5]]


def test_soak_memory_is_flat(report):
    samples = [s for s in report.samples if s.t_s >= WARM_UP_S and s.rss_bytes]
    assert len(samples) >= 6, f"only {len(samples)} samples after warm-up"
    third = len(samples) // 3
    for name in samples[0].rss_bytes:
        series = [s.rss_bytes[name] for s in samples if name in s.rss_bytes]
        if len(series) < len(samples):
            continue   # a replica restarted during the soak (not expected; the no-5xx test would say why)
        first, last = statistics.median(series[:third]), statistics.median(series[-third:])
        assert last <= first * (1 + MAX_RSS_GROWTH) + RSS_SLACK_BYTES, (
            f"{name}: resident memory grew from {first / 2**20:.0f} MiB to {last / 2**20:.0f} MiB: "
            f"{[round(v / 2**20) for v in series]}")


def test_caches_stay_bounded_and_queues_drain(serve_app_instance, report):
    config = serve_app_instance.config
    bounds = {"t3": config.t3.max_cached_voices, "s3gen": config.s3gen.max_cached_voices,
              "voice": config.voice.max_cached_voices}
    for sample in report.samples:
        for stage, memory in sample.stages.items():
            assert memory.get("num_cached_voices", 0) <= bounds[stage], (stage, memory)
            assert memory.get("num_unfinished", 0) <= config.t3.user_config.max_batch_size, (stage, memory)
    with serve_app_instance.client() as http:
        def drained():
            memory = stage_memory(http)
            return memory["t3"]["num_unfinished"] == 0 and memory["s3gen"]["num_streams"] == 0, memory

        wait_until(drained, 30, "T3 and S3Gen to finish every soak request")
