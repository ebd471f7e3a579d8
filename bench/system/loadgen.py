"""The async load generator: speech requests over HTTP, closed loop (N clients back to back) or open loop
(Poisson arrivals), each request timed chunk by chunk into a `RequestResult`.

Closed loop: each of `concurrency` clients sends its next request as soon as the last one ended, until
`duration_s` has passed; a 429 makes that client wait its Retry-After (at most `retry_after_max_s`) first.
Open loop: requests start at Poisson arrival times of `rate_per_s` for `duration_s`, whatever is in flight.
Either way requests still running at `duration_s` are drained until `hard_deadline_s`, then cancelled (and
reported as cancelled, not as errors).
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.system.measure import CANCELLED, RequestResult

log = logging.getLogger(__name__)

SPEECH_PATH = "/v1/audio/speech"


@dataclass(frozen=True)
class RequestSpec:
    """What request `index` of a level sends."""

    text: str
    stream: bool
    seed: int
    expected_audio_s: float | None = None

    def body(self, model: str) -> dict:
        return {"model": model, "input": self.text, "voice": "default", "response_format": "pcm",
                "stream": self.stream, "seed": self.seed}


def make_client(base_url: str, timeout_s: float = 600.0) -> httpx.AsyncClient:
    """One client for the whole run: enough connections for the largest level, generous timeouts."""
    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s, connect=30.0),
                             limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024))


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        return float(headers.get("retry-after", ""))
    except ValueError:
        return None


def _error_code(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


async def send_one(client: httpx.AsyncClient, spec: RequestSpec, index: int, level_t0: float, model: str,
                   results: list[RequestResult]) -> RequestResult:
    """Sends one request, reads its body as it arrives and appends its result (also when cancelled)."""
    t0 = time.perf_counter()
    res = RequestResult(index=index, stream=spec.stream, text_chars=len(spec.text), sent_at=t0 - level_t0,
                        status=CANCELLED, expected_audio_s=spec.expected_audio_s)
    results.append(res)
    try:
        async with client.stream("POST", SPEECH_PATH, json=spec.body(model)) as resp:
            if resp.status_code != 200:
                body = await resp.aread()
                res.e2e_s = time.perf_counter() - t0
                res.status, res.error_code = resp.status_code, _error_code(body)
                res.retry_after_s = _retry_after(resp.headers)
                return res
            async for data in resp.aiter_raw():
                if data:
                    res.chunk_times_s.append(time.perf_counter() - t0)
                    res.chunk_bytes.append(len(data))
                    res.audio_bytes += len(data)
            res.e2e_s = time.perf_counter() - t0
            res.status = 200
    except asyncio.CancelledError:
        res.status = CANCELLED
        raise
    except Exception as e:  # noqa: BLE001 - transport errors (httpx.HTTPError) and anything else: one failed request
        res.status = f"exc:{type(e).__name__}"
        res.e2e_s = time.perf_counter() - t0
        log.debug("request %d failed: %r", index, e)
    if res.ok and res.chunk_times_s:
        # A non-streamed file is heard only once it is whole: its time to first audio is its end-to-end time.
        res.ttfa_s = res.chunk_times_s[0] if spec.stream else res.e2e_s
    return res


async def _finish(tasks: list[asyncio.Task], hard_deadline: float) -> None:
    """Waits for `tasks` until the perf_counter time `hard_deadline`, then cancels what is left."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, hard_deadline - time.perf_counter()))
    for t in pending:
        t.cancel()
    if pending:
        log.warning("%d requests still running at the level's hard deadline: cancelled", len(pending))
        await asyncio.gather(*pending, return_exceptions=True)


async def closed_loop(client: httpx.AsyncClient, spec_for: Callable[[int], RequestSpec], *, concurrency: int,
                      duration_s: float, hard_deadline_s: float, model: str,
                      retry_after_max_s: float = 1.0) -> tuple[list[RequestResult], float]:
    """`concurrency` clients back to back for `duration_s`. -> (results, level start as perf_counter time)."""
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    stop_at, hard = t0 + duration_s, t0 + hard_deadline_s
    counter = iter(range(10**9))

    async def client_loop() -> None:
        while time.perf_counter() < stop_at:
            i = next(counter)
            res = await send_one(client, spec_for(i), i, t0, model, results)
            if res.status == 429:
                await asyncio.sleep(min(res.retry_after_s or retry_after_max_s, retry_after_max_s,
                                        max(0.0, stop_at - time.perf_counter())))

    await _finish([asyncio.create_task(client_loop()) for _ in range(concurrency)], hard)
    return results, t0


async def fixed_batch(client: httpx.AsyncClient, specs: list[RequestSpec], *, concurrency: int,
                      hard_deadline_s: float, model: str) -> list[RequestResult]:
    """Sends exactly `specs`, at most `concurrency` at a time (the warm-up)."""
    results: list[RequestResult] = []
    gate = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(i: int, spec: RequestSpec) -> None:
        async with gate:
            await send_one(client, spec, i, t0, model, results)

    await _finish([asyncio.create_task(one(i, s)) for i, s in enumerate(specs)], t0 + hard_deadline_s)
    return results


async def open_loop(client: httpx.AsyncClient, spec_for: Callable[[int], RequestSpec], *, rate_per_s: float,
                    duration_s: float, hard_deadline_s: float, model: str,
                    seed: int = 0) -> tuple[list[RequestResult], float]:
    """Poisson arrivals at `rate_per_s` for `duration_s` (a fixed seed: the same schedule every run)."""
    rng = random.Random(seed)
    results: list[RequestResult] = []
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    next_at, i = t0, 0
    while True:
        next_at += rng.expovariate(rate_per_s)
        if next_at >= t0 + duration_s:
            break
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(send_one(client, spec_for(i), i, t0, model, results)))
        i += 1
    await _finish(tasks, t0 + hard_deadline_s)
    return results, t0


class LoopLagProbe:
    """How late the load generator's event loop wakes up (a busy client would skew every latency it measures)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.lags_s: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.lags_s.append(max(0.0, time.perf_counter() - t - self.interval_s))

    def start(self) -> None:
        self.lags_s = []
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.lags_s
