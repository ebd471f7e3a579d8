"""Clients that hang up mid-request, many at once and at random points, free everything they held: T3 slots and
S3Gen streams (GET /v1/memory and the stage queue gauges return to zero), and a following request is as fast as
one before them."""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import pytest
from fault_tools import queue_gauges, replica_ids, speech_outcome, stage_memory, wait_ready, wait_until
from serve_fixture import API_KEY

pytestmark = pytest.mark.timeout(420)

NUM_CLIENTS = 10             # each holds 2 S3Gen (and T3) calls (look-ahead): 20, within cpu-tiny's 8 running
                             # + 16 queued per stage, so none is refused with a 429
# long enough that a leaked request would keep T3 and S3Gen busy far past the drain bound below
LONG_TEXT = " ".join(f"Sentence {i} of a long passage that keeps the stages busy for a good while." for i in range(12))
PROBE = {"input": "A short probe, two chunks at most.", "response_format": "pcm"}
DRAIN_S = 8.0                 # stage state empty within this long of the last hang-up (a leak would run far longer)
GAUGE_S = 60.0                # Ray exports gauges every few seconds
SLOWER_FACTOR = 2.0           # a probe after the hang-ups takes at most this times as long (+ slack) as before
SLACK_S = 3.0


async def timed_probe(base_url: str) -> float:
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        outcome = await speech_outcome(client, PROBE, timeout_s=120)
    assert outcome.kind == "complete", outcome
    return outcome.seconds


async def hang_up_storm(base_url: str, seed: int) -> list:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 4)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 limits=limits) as client:
        tasks = []
        for i in range(NUM_CLIENTS):
            body = {"input": LONG_TEXT, "response_format": rng.choice(["pcm", "mp3", "opus", "wav"]), "seed": i}
            kind = i % 4
            if kind == 1:
                body["stream_format"] = "sse"
            elif kind == 2:
                body["stream"] = False           # a whole file: the client gives up while it is being made
            if kind in (0, 1) and rng.random() < 0.5:   # after the first audio, at a random byte
                tasks.append(speech_outcome(client, body, timeout_s=120, hang_up_after_bytes=rng.randint(1, 40_000)))
            else:                                      # at a random time, before or after the first audio
                tasks.append(speech_outcome(client, body, timeout_s=120, hang_up_after_s=rng.uniform(0.3, 6.0)))
        return await asyncio.gather(*tasks)


def test_clients_that_hang_up_free_their_slots(serve_app_instance):
    base_url = serve_app_instance.base_url
    with serve_app_instance.client() as http:
        wait_ready(http)
        before = min(asyncio.run(timed_probe(base_url)) for _ in range(2))

        outcomes = asyncio.run(hang_up_storm(base_url, seed=7))
        hung_up_at = time.monotonic()
        kinds = Counter(o.kind for o in outcomes)
        assert kinds["disconnected"] >= NUM_CLIENTS - 1, (kinds, outcomes)   # (a very early one may end first)
        assert not kinds.keys() & {"bad", "hang", "proxy_error"}, (kinds, outcomes)

        def drained():
            memory = stage_memory(http)
            return memory["t3"]["num_unfinished"] == 0 and memory["s3gen"]["num_streams"] == 0, memory

        wait_until(drained, DRAIN_S, "T3 slots and S3Gen streams to be freed")
        drained_s = time.monotonic() - hung_up_at

        live = {"T3Stage": replica_ids("T3Stage"), "S3GenStage": replica_ids("S3GenStage")}

        def gauges_zero():
            gauges = queue_gauges(serve_app_instance.metrics_url, live)
            return set(gauges) == set(live) and all(v == 0 for v in gauges.values()), gauges

        wait_until(gauges_zero, GAUGE_S, "chatterbox_{t3,s3gen}_queue_depth of the live replicas to read 0",
                   interval_s=2)

        after = asyncio.run(timed_probe(base_url))
    print(f"\nprobe {before:.2f}s before, {after:.2f}s after {NUM_CLIENTS} hang-ups; stages empty after "
          f"{drained_s:.1f}s")
    assert after <= SLOWER_FACTOR * before + SLACK_S, (before, after)
