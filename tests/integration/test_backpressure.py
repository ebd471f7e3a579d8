"""Overload gives 429 with Retry-After (not timeouts or 500s), and clients that give up free their work.

The T3 stage admits max_ongoing_requests (8) plus max_queued_requests (16) from deploy/cpu-tiny.yaml; a burst of
40 speech requests must see some rejected at once, each with Retry-After and OpenAI's error shape. The test then hangs up on the rest (the router cancels their
stage calls) and checks the service still answers.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest
from serve_fixture import API_KEY

pytestmark = pytest.mark.timeout(600)

BURST = 40


def want_rejected(config) -> int:
    """When the burst is over: this many rejections (requests beyond what T3 admits, less a few that other
    requests' completion makes room for), or every request answered."""
    return BURST - config.t3.max_ongoing_requests - config.t3.max_queued_requests - 6


def test_burst_beyond_queue_limits_gets_429_then_recovers(serve_app_instance):
    config = serve_app_instance.config
    assert BURST > config.t3.max_ongoing_requests + config.t3.max_queued_requests

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=serve_app_instance.base_url, timeout=300,
                                     headers={"Authorization": f"Bearer {API_KEY}"},
                                     limits=httpx.Limits(max_connections=BURST)) as client:
            async def post(i: int) -> httpx.Response | None:
                try:
                    return await client.post("/v1/audio/speech", json={
                        "input": f"Burst {i}.", "response_format": "pcm", "seed": i})
                except httpx.RemoteProtocolError:
                    return None   # a stream (the default) that a full stage queue ended after its first audio

            tasks = [asyncio.create_task(post(i)) for i in range(BURST)]
            done: list[httpx.Response] = []
            want = want_rejected(config)
            try:
                for next_done in asyncio.as_completed(tasks, timeout=180):
                    response = await next_done
                    if response is not None:
                        done.append(response)
                    if sum(r.status_code != 200 for r in done) >= want:
                        break
            except asyncio.TimeoutError:
                pass
            for t in tasks:          # hang up on the rest: the router cancels their T3 and S3Gen calls
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return done

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    # every rejection is a 429 in the app's error model, whichever queue was full: a stage's (the router answers)
    # or the router's own (Ray's proxy answers, in plain text 503, which the proxy middleware reshapes).
    # How many are rejected is not asserted: S3Gen replicas call T3, and Ray Serve counts max_queued_requests
    # per caller and approximately; on the 2-core CI machine 24-36 of 40 were admitted against 24 configured.
    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in responses if r.status_code == 429]
    assert len(rejected) >= 1, statuses
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "backpressure"

    with serve_app_instance.client() as http:   # cancelled work is gone: a new request is served
        r = http.post("/v1/audio/speech", json={"input": "After the burst.", "response_format": "wav"}, timeout=180)
        assert r.status_code == 200, r.text
