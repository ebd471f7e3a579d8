"""Soak: sustained mixed speech load on a serving app for a fixed time, with memory sampled over time.

    python -m bench.soak --url http://127.0.0.1:8000 --api-key KEY --minutes 10 --concurrency 16
    python -m bench.soak --serve deploy/gpu-1x.yaml --minutes 10 --concurrency 32      # starts the app itself

Each of --concurrency workers loops until the time is up: it picks a request (streamed audio in a random format,
an SSE stream, a whole file, or a stream it hangs up on part-way), sends it, and records status, time to first
byte and duration. Every --sample-s a sampler records each stage's memory report (GET /v1/memory: on CUDA the
allocated, reserved and peak bytes of each replica), the GPU memory in use (nvidia-smi, when present) and the
resident memory of the replica processes (when a function for it is given, as the CPU soak test does).
Results: JSON and a markdown table of memory over time, to --out.

The CI soak test (tests/integration/test_soak.py) runs `run_soak` for a few minutes on CPU and asserts on the
report: no 5xx, flat memory, queues back to empty.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

logger = logging.getLogger("bench.soak")

TEXTS = (
    "Hello from the soak test.",
    "A slightly longer sentence, with a clause or two, to vary the length of the audio.",
    "Two sentences this time. The second one is short.",
    "Numbers like 42 and 3.5 are read out too, and so are abbreviations such as Dr. Smith.",
)
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
KINDS = ("stream", "sse", "file", "hang_up")


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 120.0
    concurrency: int = 4
    sample_every_s: float = 10.0
    kind_weights: tuple[float, ...] = (0.45, 0.2, 0.25, 0.1)   # stream, sse, file, hang_up
    texts: tuple[str, ...] = TEXTS
    formats: tuple[str, ...] = FORMATS
    voices: tuple[str, ...] = ("default",)
    request_timeout_s: float = 120.0
    seed: int = 0


@dataclass
class RequestRecord:
    started_s: float              # since the soak started
    kind: str
    fmt: str
    status: int | None            # None: no status line (connection failed)
    ok: bool                      # 200 and the whole body (or hung up on purpose after the first bytes)
    ttfb_s: float | None
    duration_s: float
    num_bytes: int
    error: str = ""


@dataclass
class MemorySample:
    t_s: float
    stages: dict[str, dict]       # GET /v1/memory, per stage
    gpu_used_bytes: list[int] | None
    rss_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class SoakReport:
    config: SoakConfig
    requests: list[RequestRecord] = field(default_factory=list)
    samples: list[MemorySample] = field(default_factory=list)

    def statuses(self) -> Counter:
        return Counter(r.status for r in self.requests)

    def failures(self) -> list[RequestRecord]:
        return [r for r in self.requests if not r.ok]

    def summary(self) -> dict:
        done = [r for r in self.requests if r.ok and r.kind != "hang_up"]
        ttfb = sorted(r.ttfb_s for r in done if r.ttfb_s is not None)
        dur = sorted(r.duration_s for r in done)

        def pct(values: list[float], q: float) -> float | None:
            return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

        return {"num_requests": len(self.requests), "statuses": {str(k): v for k, v in self.statuses().items()},
                "num_failures": len(self.failures()), "kinds": dict(Counter(r.kind for r in self.requests)),
                "ttfb_s_p50": pct(ttfb, 0.5), "ttfb_s_p95": pct(ttfb, 0.95), "duration_s_p50": pct(dur, 0.5),
                "duration_s_p95": pct(dur, 0.95)}

    def to_json(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "summary": self.summary(),
                "requests": [dataclasses.asdict(r) for r in self.requests],
                "samples": [dataclasses.asdict(s) for s in self.samples]}

    def memory_rows(self) -> list[dict[str, float]]:
        """Per sample: seconds, then MiB of each stage's allocated/reserved GPU memory, GPU used, RSS."""
        rows = []
        for s in self.samples:
            row: dict[str, float] = {"t_s": round(s.t_s)}
            for stage, report in sorted(s.stages.items()):
                if report.get("device") == "cuda":
                    row[f"{stage} alloc"] = report.get("allocated_bytes", 0) / 2**20
                    row[f"{stage} reserved"] = report.get("reserved_bytes", 0) / 2**20
            for i, used in enumerate(s.gpu_used_bytes or []):
                row[f"gpu{i} used"] = used / 2**20
            for name, rss in sorted(s.rss_bytes.items()):
                row[f"{name} rss"] = rss / 2**20
            rows.append(row)
        return rows

    def to_markdown(self, title: str = "Soak") -> str:
        s = self.summary()
        lines = [f"# {title}", "", f"{self.config.duration_s:.0f} s at {self.config.concurrency} concurrent "
                 f"requests: {s['num_requests']} requests, statuses {s['statuses']}, {s['num_failures']} failed; "
                 f"time to first byte p50 {s['ttfb_s_p50']} s, p95 {s['ttfb_s_p95']} s; duration p50 "
                 f"{s['duration_s_p50']} s, p95 {s['duration_s_p95']} s.", "", "Memory over time (MiB):", ""]
        rows = self.memory_rows()
        columns = list(dict.fromkeys(k for row in rows for k in row))
        if rows:
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(f"{row.get(c, float('nan')):.0f}" for c in columns) + " |" for row in rows]
        return "\n".join(lines) + "\n"


def gpu_used_bytes() -> list[int] | None:
    """Memory in use on each GPU (nvidia-smi), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return [int(float(v)) * 2**20 for v in out.split()]


async def _one_request(client: httpx.AsyncClient, rng: random.Random, config: SoakConfig,
                       started_at: float) -> RequestRecord:
    kind = rng.choices(KINDS, weights=config.kind_weights)[0]
    fmt = rng.choice(config.formats)
    body: dict = {"input": rng.choice(config.texts), "response_format": fmt, "voice": rng.choice(config.voices),
                  "seed": rng.randrange(1 << 30)}
    if kind == "sse":
        body["stream_format"] = "sse"
    elif kind == "file":
        body["stream"] = False
    hang_up_after = rng.randint(1, 4) if kind == "hang_up" else None   # pieces read before hanging up
    t0 = time.monotonic()
    record = RequestRecord(t0 - started_at, kind, fmt, None, False, None, 0.0, 0)
    try:
        async with client.stream("POST", "/v1/audio/speech", json=body,
                                 timeout=config.request_timeout_s) as response:
            record.status = response.status_code
            pieces, tail = 0, b""
            async for data in response.aiter_bytes():
                if record.ttfb_s is None:
                    record.ttfb_s = time.monotonic() - t0
                record.num_bytes += len(data)
                tail = (tail + data)[-512:]
                pieces += 1
                if hang_up_after is not None and pieces >= hang_up_after:
                    break                                   # leaving the block closes the connection
            if response.status_code != 200:
                record.error = tail[:200].decode(errors="replace")
            elif hang_up_after is not None:
                record.ok = record.num_bytes > 0
            elif kind == "sse":
                record.ok = b'"speech.audio.done"' in tail
                record.error = "" if record.ok else tail[-200:].decode(errors="replace")
            elif kind == "file":
                record.ok = record.num_bytes > 0 and int(response.headers.get("content-length", -1)) == record.num_bytes
            else:
                record.ok = record.num_bytes > 0 and "content-length" not in response.headers
    except httpx.HTTPError as exc:                          # a stream cut off mid-way lands here too
        record.error = repr(exc)[:200]
    record.duration_s = time.monotonic() - t0
    return record


async def run_soak(base_url: str, api_key: str | None, config: SoakConfig,
                   rss_fn: Callable[[], dict[str, int]] | None = None) -> SoakReport:
    """Runs the load for `config.duration_s` and samples memory; returns the report (never raises for a request)."""
    report = SoakReport(config)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency + 4)
    started_at = time.monotonic()
    deadline = started_at + config.duration_s
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:

        async def worker(index: int) -> None:
            rng = random.Random(config.seed * 1000 + index)
            while time.monotonic() < deadline:
                report.requests.append(await _one_request(client, rng, config, started_at))

        async def sample() -> None:
            stages: dict = {}
            try:
                r = await client.get("/v1/memory", timeout=30)
                stages = r.json().get("stages", {}) if r.status_code == 200 else {}
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning("memory sample failed: %r", exc)
            rss = await asyncio.to_thread(rss_fn) if rss_fn is not None else {}
            gpu = await asyncio.to_thread(gpu_used_bytes)
            report.samples.append(MemorySample(time.monotonic() - started_at, stages, gpu, rss))

        async def sampler() -> None:
            while time.monotonic() < deadline:
                await sample()
                await asyncio.sleep(max(0.0, min(config.sample_every_s, deadline - time.monotonic())))

        await asyncio.gather(sampler(), *(worker(i) for i in range(config.concurrency)))
        await sample()   # after the load: queues drained, memory at rest
    return report


def write_results(report: SoakReport, out: Path, tag: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path, md_path = out / f"soak_{tag}_{stamp}.json", out / f"soak_{tag}_{stamp}.md"
    json_path.write_text(json.dumps(report.to_json(), indent=1))
    md_path.write_text(report.to_markdown(f"Soak: {tag}"))
    return json_path, md_path


def _serve(config_path: str, checkpoint: str | None):
    """Starts a private Ray and the app of `config_path` on free ports; -> (base url, api key, stop())."""
    from serve_app.serving.config import load_deploy_file
    from serve_app.serving.launch.local_ray import free_ports, start_local_ray
    from serve_app.serving.launch.run import local_num_cpus, run_app

    config = load_deploy_file(config_path).config
    if checkpoint:
        config = config.model_copy(update={"checkpoint": config.checkpoint.model_copy(update={"source": checkpoint})})
    (port,) = free_ports(1)
    local = start_local_ray(num_cpus=local_num_cpus(config))
    run_app(config, host="127.0.0.1", port=port)

    def stop() -> None:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            local.stop()

    return f"http://127.0.0.1:{port}", (config.api_keys or [None])[0], stop


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", metavar="CONFIG", help="start the app of this deploy file (private Ray)")
    p.add_argument("--checkpoint", help="with --serve: the checkpoint source (folder, 'hub' or 'random')")
    p.add_argument("--api-key", help="Bearer key (with --url)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--sample-s", type=float, default=15.0)
    p.add_argument("--tag", default="gpu")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = None
    base_url, api_key = a.url, a.api_key
    if a.serve:
        base_url, api_key, stop = _serve(a.serve, a.checkpoint)
    try:
        config = SoakConfig(duration_s=a.minutes * 60, concurrency=a.concurrency, sample_every_s=a.sample_s)
        report = asyncio.run(run_soak(base_url, api_key, config))
    finally:
        if stop is not None:
            stop()
    paths = write_results(report, Path(a.out), a.tag)
    print(report.to_markdown(f"Soak: {a.tag}"))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
