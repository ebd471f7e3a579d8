"""Replica kills mid-load on the real app: every in-flight request completes or ends with an error the client can
see (an OpenAI-shaped status or SSE error event, or a streamed body cut off without its last chunk) within a
bound; nothing hangs; a new request succeeds within 30 s of the kill; enrolled voices survive.

Each test kills one deployment's replica processes (`ray.kill`) while a mix of speech requests (streamed audio,
SSE, whole files; the built-in and an enrolled voice) is running. Serve's controller starts a new replica; the
test waits for /readyz before it ends, so the shared instance serves the tests after it. The router's death is
covered by the middleware in Ray's HTTP proxy (api/proxy_middleware.py): no plain-text 500 from the proxy either.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
from fault_tools import kill_replicas, replica_ids, speech_outcome, stage_memory, wait_ready, wait_until
from serve_fixture import API_KEY, reference_wav

pytestmark = pytest.mark.timeout(420)

RECOVERY_S = 30.0            # the target: a new request gets audio within this long of the kill
REQUEST_BOUND_S = 150.0      # an in-flight request ends (either way) within this long: replica restart + retry
IDLE_BOUND_S = 60.0         # after the requests ended, the stages hold no request of theirs within this long
KILL_AFTER_S = 3.0           # requests are admitted and generating by then
TEXT = ("The first sentence of this request keeps the stages busy for a little while. "
        "The second sentence follows it closely and gives T3 another chunk to speak. "
        "A third sentence makes the request long enough to be running when the replica dies.")   # 3 text chunks
# allowed outcomes of a request in flight when any replica dies, the router's included (never "proxy_error")
ALLOWED_OUTCOMES = {"complete", "error", "error_event", "cut"}
# issue 13's target is zero 5xx: a request that had sent nothing is retried (stage replicas: by the router, the
# router replica: by the proxy middleware) and completes; only a second loss in one request would be a 503
ALLOWED_ERROR_STATUSES = {429}


@pytest.fixture(scope="module")
def http(serve_app_instance):
    with serve_app_instance.client(timeout=REQUEST_BOUND_S) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def voice_id(http) -> str:
    r = http.post("/v1/voices", files={"file": ("ref.wav", reference_wav(3.0, seed=11), "audio/wav")}, data={"name": "survivor"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def load(voice: str) -> list[dict]:
    """The in-flight mix: streamed audio (the default), SSE, whole files; the built-in and an enrolled voice."""
    return [
        {"input": TEXT, "response_format": "pcm", "seed": 1},
        {"input": TEXT, "response_format": "mp3", "voice": voice, "seed": 2},
        {"input": TEXT, "response_format": "pcm", "stream_format": "sse", "seed": 3},
        {"input": TEXT, "response_format": "opus", "stream": False, "voice": voice, "seed": 4},
    ]


async def kill_mid_load(base_url: str, deployment: str, voice: str) -> tuple[list, list, float, int]:
    """-> (bodies, outcomes of the in-flight requests, seconds from the kill to a new request's success,
    requests still running at the kill)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:
        bodies = load(voice)
        tasks = [asyncio.create_task(speech_outcome(client, body, timeout_s=REQUEST_BOUND_S)) for body in bodies]
        await asyncio.sleep(KILL_AFTER_S)
        running = sum(not t.done() for t in tasks)
        killed = kill_replicas(deployment)
        assert killed, f"no {deployment} replica to kill"
        killed_at = time.monotonic()

        async def recovered() -> float:
            """Seconds from the kill to a new request's first audio (its status is sent with it)."""
            while True:
                outcome = await speech_outcome(client, {"input": "Back again.", "response_format": "pcm"},
                                               timeout_s=REQUEST_BOUND_S, hang_up_after_bytes=1)
                if outcome.kind == "disconnected" and outcome.status == 200:
                    return time.monotonic() - killed_at
                await asyncio.sleep(1.0)

        recovery = asyncio.create_task(recovered())
        outcomes = await asyncio.gather(*tasks)
        recovery_s = await asyncio.wait_for(recovery, REQUEST_BOUND_S)
        return bodies, outcomes, recovery_s, running


@pytest.mark.parametrize("deployment", ["T3Stage", "S3GenStage", "VoiceStage", "SpeechIngress"])
def test_killing_a_replica_mid_load(serve_app_instance, http, voice_id, deployment):
    before = replica_ids(deployment)
    bodies, outcomes, recovery_s, running = asyncio.run(
        kill_mid_load(serve_app_instance.base_url, deployment, voice_id))
    report = [(b.get("stream"), b.get("stream_format"), b["response_format"], o.kind, o.status, o.code,
               round(o.seconds, 1), o.detail[:80]) for b, o in zip(bodies, outcomes)]
    print(f"\n{deployment} killed; {running} of {len(bodies)} running; back after {recovery_s:.1f}s")
    for row in report:
        print("  ", row)

    assert running >= 1, "every request ended before the kill: the test did not test anything"
    assert all(o.kind in ALLOWED_OUTCOMES for o in outcomes), report               # nothing hung, nothing broken
    for o in outcomes:
        if o.kind == "error":
            assert o.status in ALLOWED_ERROR_STATUSES, report                      # no 5xx
    assert recovery_s <= RECOVERY_S, f"a new request succeeded only {recovery_s:.1f}s after the kill"

    wait_ready(http)
    assert replica_ids(deployment) and replica_ids(deployment) != before          # a new replica serves
    voices = {v["id"] for v in http.get("/v1/voices").json()["data"]}
    assert voice_id in voices                                                      # enrolled voices survive
    r = http.post("/v1/audio/speech", json={"input": "Still my voice.", "voice": voice_id, "response_format": "pcm",
                                            "stream": False})
    assert r.status_code == 200 and len(r.content) > 0, r.text
    print("  outcomes:", dict(Counter(o.kind for o in outcomes)))

    # nothing leaks: work the dead replica's requests left in the other stages ends (cancelled, or run out)
    t0 = time.monotonic()

    def idle():
        memory = stage_memory(http)
        return memory["t3"]["num_unfinished"] == 0 and memory["s3gen"]["num_streams"] == 0, memory
    wait_until(idle, IDLE_BOUND_S, "the stages to be idle after the kill")
    print(f"  stages idle {time.monotonic() - t0:.1f}s after the last request")
