"""The levels of a system benchmark run: which to run, whether they fit the time left, and running one against
the app: requests through the load generator, the app's metrics scraped before and after, GPU memory peak.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.system import prom
from bench.system.gpu_monitor import GpuMonitor
from bench.system.loadgen import LoopLagProbe, RequestSpec, closed_loop, fixed_batch, make_client, open_loop
from bench.system.measure import LengthCheck, percentile, summarize
from bench.system.texts import capped_audio_s, text_for
from serve_app.contracts import FIRST_AUDIO_PHASES

log = logging.getLogger("bench_system")

RESERVE_S = 45.0           # kept back from --max-wall-s for stopping the app and writing results

Candidates = list[tuple[str, dict | None]]


@dataclass(frozen=True)
class AppMetricNames:
    """The app's metrics a level reads (bench_system.py holds the names, so they are easy to change)."""

    audio: tuple[str, dict | None]          # seconds of audio made (counter)
    stage_busy: dict[str, Candidates]       # stage -> busy-seconds candidates, first exported one wins
    streams: str | None = None              # streams finished, label stall_free="true"/"false"


class Budget:
    def __init__(self, max_wall_s: float):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + max_wall_s

    def left(self) -> float:
        """Seconds left for work, after the teardown reserve."""
        return self.deadline - RESERVE_S - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def plan_levels(a) -> list[dict]:
    levels = [{"load": "closed", "concurrency": c, "arrival_rate_per_s": None, "stream": True} for c in a.levels]
    levels += [{"load": "closed", "concurrency": c, "arrival_rate_per_s": None, "stream": False}
               for c in a.nostream_levels]
    levels += [{"load": "open", "concurrency": None, "arrival_rate_per_s": r, "stream": True} for r in a.rate]
    for lv in levels:
        lv["name"] = (f"c{lv['concurrency']}" if lv["load"] == "closed" else f"rate{lv['arrival_rate_per_s']:g}") + \
            ("-stream" if lv["stream"] else "-nostream")
    return levels


class LevelRunner:
    """Runs levels against one app: requests, scrapes, GPU peaks -> level dicts."""

    def __init__(self, a, base_url: str, metrics_url: str | None, app_settings: dict, monitor: GpuMonitor,
                 metric_names: AppMetricNames):
        self.a = a
        self.names = metric_names
        self.base_url = base_url
        self.metrics_url = metrics_url
        self.settings = app_settings
        self.monitor = monitor
        self.model = app_settings.get("model_name", "chatterbox")
        self.length_check = LengthCheck(a.length_tolerance_s, a.length_min_ratio)

    def spec_for(self, stream: bool, seed_base: int = 0):
        s = self.settings

        def spec(i: int) -> RequestSpec:
            text = text_for(i)
            expected = capped_audio_s(text, max_new_tokens=s.get("max_new_tokens", 1000),
                                      max_seconds_per_char=s.get("max_seconds_per_char", self.a.seconds_per_char),
                                      max_chunk_chars=s.get("max_chunk_chars", 300))
            return RequestSpec(text=text, stream=stream, seed=seed_base + i, expected_audio_s=expected)

        return spec

    def _scrape(self):
        return prom.scrape(self.metrics_url) if self.metrics_url else None

    async def warmup(self, client: httpx.AsyncClient, num: int, hard_deadline_s: float) -> dict:
        """`num` streaming requests (up to 8 at once) and one non-streaming, not measured as a level."""
        t = time.monotonic()
        stream, once = self.spec_for(True, 10**6), self.spec_for(False, 2 * 10**6)
        specs = [stream(i) for i in range(num)] + ([once(0)] if self.a.nostream_levels else [])
        results = await fixed_batch(client, specs, concurrency=min(8, num), hard_deadline_s=hard_deadline_s,
                                    model=self.model)
        ok = [r for r in results if r.ok]
        out = {"requests": len(results), "ok": len(ok), "seconds": time.monotonic() - t,
               "statuses": sorted({str(r.status) for r in results}),
               "e2e_max_s": max((r.e2e_s for r in ok if r.e2e_s), default=None)}
        log.info("warm-up: %s", out)
        return out

    async def run(self, client: httpx.AsyncClient, level: dict, hard_deadline_s: float) -> dict:
        a = self.a
        self.monitor.phase = level["name"]
        mon_t0 = self.monitor.now()
        before = await asyncio.to_thread(self._scrape)
        probe = LoopLagProbe()
        probe.start()
        t_start = time.monotonic()
        spec = self.spec_for(level["stream"])
        if level["load"] == "closed":
            results, _ = await closed_loop(client, spec, concurrency=level["concurrency"], duration_s=a.duration_s,
                                           hard_deadline_s=hard_deadline_s, model=self.model,
                                           retry_after_max_s=a.retry_after_max_s)
        else:
            results, _ = await open_loop(client, spec, rate_per_s=level["arrival_rate_per_s"],
                                         duration_s=a.duration_s, hard_deadline_s=hard_deadline_s, model=self.model)
        wall_s = time.monotonic() - t_start
        lags = await probe.stop()
        await asyncio.sleep(a.metrics_settle_s)
        after = await asyncio.to_thread(self._scrape)
        self.monitor.phase = "between levels"
        out = dict(level)
        out["duration_s"] = a.duration_s
        out.update(summarize(results, window_s=a.duration_s, stall_tolerance_s=a.stall_tolerance_s,
                             length_check=self.length_check))
        out["wall_s"] = wall_s
        out["gpu_peak_mib"] = self.monitor.peak_mib(mon_t0)
        out["client_loop_lag_p99_ms"] = (percentile(lags, 99) or 0.0) * 1e3
        out.update(self.stage_costs(before, after, out["audio_s"]))
        log.info("%s: %d requests, %d ok, errors %s, %.1f audio s/s, TTFA p50 %s s p95 %s s, stall-free %s, "
                 "GPU peak %s MiB, stage GPU-ms/audio s %s, engine %s", level["name"], out["requests"], out["ok"],
                 out["errors_by_status"], out["audio_s_per_s"] or 0, _r(out["ttfa_p50_s"]), _r(out["ttfa_p95_s"]),
                 _r(out["stall_free_fraction"]), out["gpu_peak_mib"], out["stage_gpu_ms_per_audio_s"],
                 {k: _r(v) for k, v in out["engine"].items()})
        return out

    def stage_costs(self, before, after, client_audio_s: float) -> dict:
        """Per stage: busy seconds over the level and GPU-ms per second of audio (None where not exported)."""
        app_audio = prom.delta(before, after, *self.names.audio)
        audio = app_audio if app_audio else client_audio_s
        busy, per_audio, sources = {}, {}, {}
        for stage, candidates in self.names.stage_busy.items():
            d, name = prom.first_delta(before, after, candidates)
            busy[stage] = d
            per_audio[stage] = 1e3 * d / audio if d is not None and audio else None
            if name:
                sources[stage] = name
        streams = self.names.streams
        stall_free = prom.delta(before, after, streams, {"stall_free": "true"}) if streams else None
        stalled = prom.delta(before, after, streams, {"stall_free": "false"}) if streams else None
        app_streams = (stall_free or 0) + (stalled or 0)
        return {"app_audio_s": app_audio, "stage_busy_s": busy, "stage_gpu_ms_per_audio_s": per_audio,
                "stage_metric_sources": sources, "engine": engine_stats(before, after),
                "app_stall_free_fraction": (stall_free or 0) / app_streams if app_streams else None}


def _mean(before, after, total: str, hist: str, labels: dict[str, str] | None = None) -> float | None:
    """Exact mean of a histogram's observations over the level: the delta of the `total` counter the app keeps
    beside it (the observed values' exact sum) / the delta of the histogram's `_count`. Not the histogram's `_sum`:
    Ray rebuilds that from bucket midpoints (serve_app/serving/metrics.py)."""
    n = prom.delta(before, after, hist + "_count", labels)
    t = prom.delta(before, after, total, labels)
    return t / n if n and t is not None else None


def first_audio_phases(before, after) -> dict[str, float | None]:
    """Mean seconds of each part of a stream's time to first audio over the level (the router's metrics)."""
    return {phase: _mean(before, after, "chatterbox_first_audio_phase_seconds_total",
                         "chatterbox_first_audio_phase_seconds", {"phase": phase})
            for phase in (*FIRST_AUDIO_PHASES, "router")}


STEP_REASONS = ("first", "target", "urgent", "final", "one-shot")   # vocode_scheduler.VocodeScheduler.ready_reason


def steps_by_reason(before, after) -> dict[str, float | None]:
    """A text chunk's vocoder steps over the level by why each ran (the S3Gen scheduler's rule), per text chunk
    (chunks: their first or one-shot steps)."""
    n = {r: prom.delta(before, after, "chatterbox_s3gen_stream_steps_total", {"reason": r}) for r in STEP_REASONS}
    chunks = (n["first"] or 0) + (n["one-shot"] or 0)
    return {r: _ratio(v, chunks) for r, v in n.items()}


CHUNK_FINISHES = ("stop", "length", "incomplete")   # chatterbox_s3gen_chunks_total's finish tag


def chunks_by_finish(before, after) -> dict[str, float | None]:
    """Text chunks finished over the level by how T3 ended them: a chunk that ended on T3's stop token is short
    by the model's choice (random weights sample it now and then), which the bench's length check cannot tell
    from lost audio."""
    return {f: prom.delta(before, after, "chatterbox_s3gen_chunks_total", {"finish": f}) for f in CHUNK_FINISHES}


def engine_stats(before, after) -> dict:
    """What the stages did over the level: mean batch sizes and step times, T3 slot occupancy, and flow tokens
    per new token vocoded (None for what the app does not export)."""
    flow = prom.delta(before, after, "chatterbox_s3gen_flow_tokens_total")
    new = prom.delta(before, after, "chatterbox_s3gen_speech_tokens_total")
    padded = prom.delta(before, after, "chatterbox_s3gen_flow_padded_tokens_total")
    needed = prom.delta(before, after, "chatterbox_s3gen_flow_row_tokens_total")
    return {
        "t3_batch_mean": _mean(before, after, "chatterbox_t3_step_requests_total", "chatterbox_t3_batch_size"),
        "t3_step_mean_s": _mean(before, after, "chatterbox_t3_busy_seconds_total", "chatterbox_t3_step_seconds"),
        "t3_occupancy_mean": _mean(before, after, "chatterbox_t3_step_occupancy_total",
                                   "chatterbox_t3_batch_occupancy_ratio"),
        "t3_steps": prom.delta(before, after, "chatterbox_t3_step_seconds_count"),
        "t3_kv_read_ratio": _ratio(prom.delta(before, after, "chatterbox_t3_kv_positions_read_total"),
                                   prom.delta(before, after, "chatterbox_t3_kv_positions_used_total")),
        "s3gen_batch_mean": _mean(before, after, "chatterbox_s3gen_step_streams_total", "chatterbox_s3gen_batch_size"),
        "s3gen_new_tokens_per_step": _mean(before, after, "chatterbox_s3gen_speech_tokens_total",
                                           "chatterbox_s3gen_batch_tokens"),
        "s3gen_step_mean_s": _mean(before, after, "chatterbox_s3gen_busy_seconds_total",
                                   "chatterbox_s3gen_batch_seconds"),
        "s3gen_steps": prom.delta(before, after, "chatterbox_s3gen_batch_seconds_count"),
        "s3gen_flow_calls_per_step": _ratio(prom.delta(before, after, "chatterbox_s3gen_flow_calls_total"),
                                            prom.delta(before, after, "chatterbox_s3gen_batch_seconds_count")),
        "vocoded_per_produced_token": _ratio(flow, new),
        "s3gen_flow_padding_ratio": _ratio(padded, needed),
        # what the flow ran per new token: the rows' prompt, context, new and look-ahead tokens, then with padding
        "s3gen_row_tokens_per_new_token": _ratio(needed, new),
        "s3gen_padded_tokens_per_new_token": _ratio(padded, new),
        "s3gen_graph_captures": prom.delta(before, after, "chatterbox_s3gen_graph_captures_total"),
        "s3gen_steps_per_chunk_by_reason": steps_by_reason(before, after),
        "s3gen_chunks_by_finish": chunks_by_finish(before, after),
        "first_audio_phase_mean_s": first_audio_phases(before, after),
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def _r(x):
    if isinstance(x, dict):
        return {k: _r(v) for k, v in x.items()}
    return None if x is None else round(x, 3)


async def run_levels(a, runner: LevelRunner, budget: Budget, result: dict,
                     after_level: Callable[[], None],
                     variants: list[tuple[str, Callable[[], dict] | None]] | None = None) -> None:
    """Warm-up, then every planned level that fits the budget (the others go to result["skipped_levels"]);
    `after_level` runs after each level (the caller writes the results so far). variants: [(name, apply)]: the
    planned levels once per variant, `apply()` (in a thread; -> what it did, kept in result["variants"]) before
    its levels; each level then carries "variant" and the name as a suffix."""
    async with make_client(runner.base_url) as client:
        if a.warmup_requests:
            result["warmup"] = await runner.warmup(client, a.warmup_requests,
                                                   min(a.max_drain_s + 60, max(10.0, budget.left())))
            await asyncio.sleep(a.metrics_settle_s)   # the warm-up's metrics reach Ray's endpoint before level 1
        longest_e2e = (result.get("warmup") or {}).get("e2e_max_s") or 10.0
        planned = []
        for name, apply in variants or [(None, None)]:
            planned += [(name, apply if i == 0 else None,
                         {**lv, **({"variant": name, "name": f"{lv['name']}-{name}"} if name else {})})
                        for i, lv in enumerate(plan_levels(a))]
        for variant, apply, level in planned:
            if apply is not None:
                result.setdefault("variants", {})[variant] = await asyncio.to_thread(apply)
                log.info("variant %s applied: %s", variant, result["variants"][variant])
            need = a.duration_s + min(a.max_drain_s, longest_e2e) + a.metrics_settle_s
            if budget.left() < need:
                reason = f"{budget.left():.0f} s left of --max-wall-s, needs ~{need:.0f} s"
                log.warning("skipping %s: %s", level["name"], reason)
                result["skipped_levels"].append({**level, "reason": reason})
                continue
            hard = min(a.duration_s + a.max_drain_s, budget.left() - a.metrics_settle_s)
            level_out = await runner.run(client, level, hard)
            if level_out.get("e2e_p99_s"):
                longest_e2e = max(longest_e2e, level_out["e2e_p99_s"])
            result["levels"].append(level_out)
            after_level()
