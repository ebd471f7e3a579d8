"""What the fault, disconnect and soak tests share: finding and killing replica actors, reading their memory and
the stage gauges, and classifying what a client saw of one speech request. Everything is bounded in time."""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass

import httpx

APP = "chatterbox"
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


# -- replicas ---------------------------------------------------------------------------------------------------------

def replica_names(deployment: str) -> list[tuple[str, str]]:
    """(actor name, namespace) of the deployment's live replicas: Serve names them SERVE_REPLICA::<app>#<dep>#<id>."""
    import ray

    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")]


def replica_ids(deployment: str) -> set[str]:
    return {name.rsplit("#", 1)[1] for name, _ in replica_names(deployment)}


def kill_replicas(deployment: str) -> list[str]:
    """Kills the deployment's replica processes as a crash would (`ray.kill`, no restart by Ray itself: Serve's
    controller sees the actor die and starts a new replica). Returns the killed replica ids."""
    import ray

    killed = []
    for name, namespace in replica_names(deployment):
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        killed.append(name.rsplit("#", 1)[1])
    return killed


def replica_pids(deployment: str, timeout_s: float = 30) -> dict[str, int]:
    """Replica id -> its process id (asked of the actor itself, so another Ray instance's replicas never count)."""
    import ray

    refs = {name.rsplit("#", 1)[1]: ray.get_actor(name, namespace=ns).__ray_call__.remote(lambda self: os.getpid())
            for name, ns in replica_names(deployment)}
    return {rid: ray.get(ref, timeout=timeout_s) for rid, ref in refs.items()}


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc; no psutil in the environment)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- stage state --------------------------------------------------------------------------------------------------------

def stage_memory(client: httpx.Client) -> dict:
    r = client.get("/v1/memory", timeout=30)
    r.raise_for_status()
    return r.json()["stages"]


def queue_gauges(metrics_url: str, live_replicas: dict[str, set[str]]) -> dict[str, float]:
    """The latest chatterbox_{t3,s3gen}_queue_depth of the live replicas (series of killed ones are ignored),
    summed per stage, from Ray's Prometheus endpoint (`ray_` prefix or not)."""
    text = httpx.get(metrics_url, timeout=10).text
    totals: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].removeprefix("ray_")
        stage = {"chatterbox_t3_queue_depth": "T3Stage", "chatterbox_s3gen_queue_depth": "S3GenStage"}.get(name)
        if stage is None or "{" not in line:
            continue
        labels = dict(part.split("=", 1) for part in line.split("{", 1)[1].rsplit("}", 1)[0].split(",") if "=" in part)
        replica = labels.get("replica", "").strip('"')
        if not any(replica.endswith(rid) for rid in live_replicas.get(stage, ())):
            continue
        totals[stage] = totals.get(stage, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 1.0):
    """Polls `predicate()` (-> (ok, detail)) until ok; fails with the last detail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    detail = None
    while True:
        try:
            ok, detail = predicate()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            ok, detail = False, repr(exc)
        if ok:
            return detail
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {detail}")
        time.sleep(interval_s)


def wait_ready(client: httpx.Client, timeout_s: float = 180) -> None:
    def ready():
        r = client.get("/readyz", timeout=30)
        return r.status_code == 200, r.text[:300]

    wait_until(ready, timeout_s, "/readyz", interval_s=2)


# -- what a client saw --------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One speech request as its client saw it.

    kind: "complete" (all the audio), "error" (an OpenAI-shaped error body with a status), "error_event" (an SSE
    stream that ended with an OpenAI-shaped `error` event), "cut" (a streamed body that ended without its last
    chunk), "proxy_error" (a status with a body that is not ours: Ray's HTTP proxy), "disconnected" (the client
    hung up on purpose), "bad" (anything else: a broken promise), "hang" (no end within the bound)."""

    kind: str
    status: int | None = None
    code: str | None = None
    num_bytes: int = 0
    seconds: float = 0.0
    detail: str = ""


def _openai_error(body: object) -> dict | None:
    if isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict) \
            and set(body["error"]) == OPENAI_ERROR_FIELDS and body["error"]["message"] and body["error"]["type"]:
        return body["error"]
    return None


def classify(status: int, headers: httpx.Headers, data: bytes, body: dict) -> Outcome:
    """A finished response -> its Outcome (without timing)."""
    if status != 200:
        try:
            error = _openai_error(json.loads(data))
        except ValueError:
            error = None
        if error is not None:
            return Outcome("error", status, str(error["code"]), len(data), detail=error["message"][:200])
        return Outcome("proxy_error", status, None, len(data), detail=data[:200].decode(errors="replace"))
    if body.get("stream_format") == "sse":
        events = [json.loads(line[6:]) for line in data.decode().split("\n") if line.startswith("data: ")]
        last = events[-1] if events else {}
        if last.get("type") == "speech.audio.done" and len(events) >= 2:
            return Outcome("complete", status, None, len(data))
        if last.get("type") == "error" and _openai_error({"error": last.get("error")}) is not None:
            return Outcome("error_event", status, str(last["error"]["code"]), len(data),
                           detail=last["error"]["message"][:200])
        return Outcome("bad", status, None, len(data), detail=f"SSE ended with {str(last)[:200]}")
    if body.get("stream") is False:
        declared = headers.get("content-length")
        if declared is None or int(declared) != len(data) or not data:
            return Outcome("bad", status, None, len(data), detail=f"file of {len(data)} bytes, declared {declared}")
    elif not data or "content-length" in headers:
        return Outcome("bad", status, None, len(data), detail=f"stream of {len(data)} bytes, headers {headers}")
    return Outcome("complete", status, None, len(data))


async def speech_outcome(client: httpx.AsyncClient, body: dict, *, timeout_s: float,
                         hang_up_after_bytes: int | None = None, hang_up_after_s: float | None = None) -> Outcome:
    """Sends one speech request and reads it to its end (or hangs up after `hang_up_after_bytes` bytes or
    `hang_up_after_s` seconds), bounded by `timeout_s`."""
    t0 = time.monotonic()

    async def run() -> Outcome:
        num_bytes = 0
        async with client.stream("POST", "/v1/audio/speech", json=body, timeout=timeout_s) as response:
            parts = []
            try:
                async for data in response.aiter_bytes():
                    parts.append(data)
                    num_bytes += len(data)
                    if hang_up_after_bytes is not None and num_bytes >= hang_up_after_bytes:
                        return Outcome("disconnected", response.status_code, None, num_bytes)
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                return Outcome("cut", response.status_code, None, num_bytes, detail=repr(exc)[:200])
            return classify(response.status_code, response.headers, b"".join(parts), body)

    try:
        if hang_up_after_s is not None:
            try:
                outcome = await asyncio.wait_for(run(), hang_up_after_s)
            except asyncio.TimeoutError:
                outcome = Outcome("disconnected")
        else:
            outcome = await asyncio.wait_for(run(), timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        outcome = Outcome("hang", detail=f"no end after {timeout_s:.0f}s")
    except httpx.HTTPError as exc:   # the connection failed before a status line
        outcome = Outcome("cut", detail=repr(exc)[:200])
    outcome.seconds = time.monotonic() - t0
    return outcome
