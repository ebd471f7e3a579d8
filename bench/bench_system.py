"""System benchmark: the real app from a deploy file, driven over HTTP, against upstream chatterbox in the same run.
The source of every system-level figure in the README.

    python3 -m bench.bench_system --checkpoint DIR                 # GPU: deploy/gpu-1x.yaml, levels 1..128
    python3 -m bench.bench_system --smoke --out /tmp/bench_smoke   # CPU: deploy/cpu-tiny.yaml, levels 1,2

1. Upstream `ChatterboxTTS` (bench/system/upstream.py) speaks --upstream-requests texts one at a time, in a
   child process, before the app starts: seconds of audio per second.
2. The app starts (`python3 -m serve_app.cli serve --config FILE`, FILE = --config with the bench's overrides,
   written to --out) and is polled on /readyz.
3. Warm-up requests, then each level: a closed loop of N clients (streaming, then non-streaming), then open-loop
   Poisson arrivals at each --rate. Every request speaks the next text of a fixed mixed list
   (bench/system/texts.py) as raw PCM, capped at 2 s + --seconds-per-char s per character of speech
   (router.settings.max_seconds_per_char: random weights never emit the stop token).
4. Per level: audio s/s, time to first audio p50/p95/p99, end to end, stall-free streams, errors by status,
   whether audio has the capped length, GPU memory of all processes (NVML, every second) and each stage's
   GPU-busy ms per second of audio (app metrics scraped from Ray's endpoint before and after the level).
5. The app is stopped (its whole process tree; `ray stop --force` on a GPU run) whatever happens, also on
   SIGTERM, and bench_system.json, .md and two PNG plots are written to --out.

--max-wall-s bounds the whole run: a level that would not end in time is skipped and reported as skipped, so a
run always finishes and writes its results within one device call.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.system import report  # noqa: E402
from bench.system.gpu_monitor import GpuMonitor  # noqa: E402
from bench.system.levels import RESERVE_S, AppMetricNames, Budget, LevelRunner, run_levels  # noqa: E402
from bench.system.server import AppServer, app_args, parse_override, with_overrides  # noqa: E402
from bench.system.upstream import run_upstream  # noqa: E402
from bench.versions import versions as _versions  # noqa: E402

# -- the app's metrics this bench reads (names without Ray's `ray_` prefix) -------------------------------------
APP_METRICS = AppMetricNames(
    # Seconds of audio the app made: the denominator of GPU-ms per audio second.
    audio=("chatterbox_audio_seconds_total", {"stage": "router"}),
    # Per stage, the first of these that the app exports is its busy time (a counter, or a histogram's _sum).
    stage_busy={
        "t3": [("chatterbox_t3_busy_seconds_total", None), ("chatterbox_t3_gpu_busy_seconds_total", None),
               ("chatterbox_t3_step_seconds_sum", None)],
        "s3gen": [("chatterbox_s3gen_busy_seconds_total", None), ("chatterbox_s3gen_gpu_busy_seconds_total", None),
                  ("chatterbox_s3gen_batch_seconds_sum", None)],
        "voice": [("chatterbox_voice_busy_seconds_total", None)],
    },
    # The app's own count of stall-free streams (label stall_free="true" / "false"), where it has one.
    streams="chatterbox_streams_total",
)
# ---------------------------------------------------------------------------------------------------------------

log = logging.getLogger("bench_system")

RESULT_NAME = "bench_system"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="deploy/cpu-tiny.yaml on CPU, tiny levels: checks the "
                   "script itself")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder for the app and upstream (default: the "
                   "deploy file's source; upstream then uses random weights of its preset)")
    p.add_argument("--config", default=None, help="deploy file (default deploy/gpu-1x.yaml; smoke cpu-tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override below the app's args, e.g. router.settings.max_active_speech_requests=128 "
                   "(repeatable; the value is YAML)")
    p.add_argument("--seconds-per-char", type=float, default=0.07,
                   help="token cap: 2 s + this many seconds per character (router.settings.max_seconds_per_char)")
    p.add_argument("--max-active", type=int, default=None, help="router.settings.max_active_speech_requests "
                   "(default: the deploy file's)")
    p.add_argument("--watermark", action="store_true", help="Perth watermark on (default off, in app and upstream)")
    p.add_argument("--levels", default=None, help="closed-loop streaming concurrencies (default 1,8,32,64,128,256; "
                   "smoke 1,2)")
    p.add_argument("--nostream-levels", default=None, help="closed-loop non-streaming concurrencies (default 64; "
                   "smoke 1; '' for none)")
    p.add_argument("--stream-modes", default="stream,nostream", help="which of stream,nostream to run")
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="after the levels as deployed, run them again with S3Gen's user_config keys set, applied to "
                   "the running replicas (no restart: the same app, the same machine), e.g. cover1:first_step_cover=1"
                   " (repeatable; values are YAML)")
    p.add_argument("--rate", default=None, help="open-loop Poisson arrival rates, req/s, streaming (default none; "
                   "smoke 0.5)")
    p.add_argument("--duration-s", type=float, default=None, help="seconds each level sends requests (default 20; "
                   "smoke 8)")
    p.add_argument("--max-drain-s", type=float, default=None, help="after a level's duration, wait at most this "
                   "long for its requests to end (default 45; smoke 90)")
    p.add_argument("--warmup-requests", type=int, default=None, help="before the levels (default 16; smoke 1)")
    p.add_argument("--upstream-requests", type=int, default=None, help="timed upstream requests (default 6; smoke 1)")
    p.add_argument("--upstream-max-s", type=float, default=None, help="upstream's time limit, load included "
                   "(default 150)")
    p.add_argument("--skip-upstream", action="store_true")
    p.add_argument("--server-url", default=None, help="use this running app instead of starting one")
    p.add_argument("--metrics-url", default=None, help="its Prometheus endpoint (with --server-url)")
    p.add_argument("--port", type=int, default=None, help="the app's HTTP port (default: a free one)")
    p.add_argument("--ready-timeout-s", type=float, default=None, help="default 300; smoke 420")
    p.add_argument("--max-wall-s", type=float, default=None, help="whole run, upstream and app start included "
                   "(default 540; smoke 900)")
    p.add_argument("--allow-short-wall", action="store_true", help="run even when --max-wall-s leaves no time "
                   "for the first level after a typical app start (the levels are then likely skipped)")
    p.add_argument("--retry-after-max-s", type=float, default=1.0, help="a closed-loop client waits the 429's "
                   "Retry-After, at most this long")
    p.add_argument("--profile-steps", type=int, default=0, help="T3 and S3Gen each record one torch.profiler "
                   "window of this many engine steps into --out/profile (serving/stages/step_profiler.py; 0: off)")
    p.add_argument("--profile-min-batch", default="32,8", help="T3,S3Gen: the window opens at the first step with "
                   "at least this many rows (requests, streams)")
    p.add_argument("--stall-tolerance-s", type=float, default=0.0)
    p.add_argument("--length-tolerance-s", type=float, default=1.0)
    p.add_argument("--length-min-ratio", type=float, default=0.7)
    p.add_argument("--metrics-settle-s", type=float, default=3.0, help="wait before the after-level scrape (Ray "
                   "reports app metrics every second here)")
    p.add_argument("--ray-stop-force", default=None, choices=["on", "off"],
                   help="`ray stop --force` after the app stops (default on, off with --smoke: it stops every "
                   "Ray instance on the machine)")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    s = a.smoke
    a.config = a.config or ("deploy/cpu-tiny.yaml" if s else "deploy/gpu-1x.yaml")
    modes = {m.strip() for m in a.stream_modes.split(",")}
    a.levels = _ints(a.levels if a.levels is not None else ("1,2" if s else "1,8,32,64,128,256")) \
        if "stream" in modes else []
    a.nostream_levels = _ints(a.nostream_levels if a.nostream_levels is not None else ("1" if s else "64")) \
        if "nostream" in modes else []
    a.rate = _floats(a.rate if a.rate is not None else ("0.5" if s else ""))
    a.duration_s = a.duration_s or (8.0 if s else 20.0)
    a.max_drain_s = a.max_drain_s or (90.0 if s else 45.0)
    a.warmup_requests = a.warmup_requests if a.warmup_requests is not None else (1 if s else 16)
    a.upstream_requests = a.upstream_requests or (1 if s else 6)
    a.upstream_max_s = a.upstream_max_s or 150.0
    a.ready_timeout_s = a.ready_timeout_s or (420.0 if s else 300.0)
    a.max_wall_s = a.max_wall_s or (900.0 if s else 540.0)
    a.ray_stop_force = (a.ray_stop_force or ("off" if s else "on")) == "on"
    a.device = "cpu" if s else "cuda"
    try:
        a.variants = [parse_variant(v) for v in a.variants]
    except ValueError as e:
        p.error(str(e))
    if a.variants and a.server_url:
        p.error("--variant rewrites the config file of the app the bench starts: not with --server-url")
    floor = min_wall_s(a)
    if floor and a.max_wall_s < floor and not a.allow_short_wall:
        p.error(f"--max-wall-s {a.max_wall_s:g} counts the app's start (up to ~{APP_START_S:g} s on an H200), "
                f"{'' if a.skip_upstream else 'upstream (~45 s), '}the {RESERVE_S:g} s teardown reserve and the "
                f"warm-up: the first level would be skipped. Use >= {floor:g} (or --allow-short-wall)")
    return a


def parse_variant(text: str) -> tuple[str, dict]:
    """`cover1:first_step_cover=1.0,urgent_steps=2` -> ("cover1", {...}): keys of S3Gen's user_config."""
    from serve_app.serving.config import S3GenUserConfig

    name, sep, body = text.partition(":")
    pairs = [parse_override(item) for item in body.split(",") if item.strip()] if sep else []
    if not name.strip() or not pairs:
        raise ValueError(f"--variant {text!r}: use NAME:KEY=VALUE[,KEY=VALUE], e.g. cover1:first_step_cover=1.0")
    unknown = sorted(k for k, _ in pairs if k not in S3GenUserConfig.model_fields)
    if unknown:
        raise ValueError(f"--variant {text!r}: {', '.join(unknown)} not among S3Gen's user_config keys "
                         f"({', '.join(S3GenUserConfig.model_fields)})")
    return name.strip(), dict(pairs)


APP_START_S = 130.0   # the app's start on an H200: 77-131 s in the committed runs (bench/README.md)


def min_wall_s(a) -> float:
    """The least --max-wall-s whose first level can run when the bench starts the app on a GPU (0: no floor)."""
    if a.smoke or a.server_url or not (a.levels or a.nostream_levels or a.rate):
        return 0.0
    return RESERVE_S + APP_START_S + (0.0 if a.skip_upstream else 45.0) + 10.0 + a.duration_s + 15.0


# -- run facts ----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str, env: dict | None = None, cwd: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def working_tree_id(root: Path = REPO) -> str | None:
    """Git's tree id of the checkout as it is, uncommitted changes and untracked files included (ignored ones and
    the carried `.whl/` not): `git rev-parse COMMIT^{tree}` of the commit whose files ran, whatever HEAD the
    checkout's git metadata says (a device machine's copy of the tree can carry stale metadata). Find the commit:
    `git log --all --format='%h %T' | grep TREE`. Built in a throwaway index; the repo's own index is untouched."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(d) / "index")}
        (Path(d) / "exclude").write_text("/.whl/\n")
        if _git("-c", f"core.excludesFile={Path(d) / 'exclude'}", "add", "-A", ".", env=env, cwd=root) is None:
            return None
        return _git("write-tree", env=env, cwd=root)


def versions() -> dict:
    return _versions("torch", "ray", "chatterbox-tts", "chatterbox-serve", "httpx", "numpy", "nvidia-ml-py")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} x{os.cpu_count()}"


def write_results(result: dict, out: Path, final: bool = False) -> None:
    (out / f"{RESULT_NAME}.json").write_text(json.dumps(result, indent=2, default=str))
    if final:
        try:
            result["plots"] = report.plots(result, out)
        except Exception:  # noqa: BLE001 - the numbers matter more than the pictures
            log.exception("plots failed")
        (out / f"{RESULT_NAME}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{RESULT_NAME}.md").write_text(report.markdown(result))


# -- the deploy file ----------------------------------------------------------------------------------------

def effective_config(a) -> tuple[dict, dict]:
    """-> (the deploy file with the bench's overrides, the overrides)."""
    raw = yaml.safe_load(Path(a.config).read_text())
    args = app_args(raw)
    overrides: dict = {"router.settings.max_seconds_per_char": a.seconds_per_char}
    if not a.watermark:
        overrides["watermark"] = False
    if a.max_active is not None:
        overrides["router.settings.max_active_speech_requests"] = a.max_active
        ongoing = (args.get("router") or {}).get("max_ongoing_requests", 64)
        if ongoing <= a.max_active:   # the app requires max_active_speech_requests < the router's max_ongoing
            overrides["router.max_ongoing_requests"] = a.max_active + 32
    if a.profile_steps:
        overrides.update(profile_overrides(a.profile_steps, a.profile_min_batch, Path(a.out) / "profile"))
    overrides.update(parse_override(o) for o in a.overrides)
    return with_overrides(raw, overrides, Path(a.config)), overrides


def profile_overrides(steps: int, min_batch: str, folder: Path) -> dict:
    """The stage replicas' environment for one profiler window each (serve_app.envs: CHATTERBOX_PROFILE_*)."""
    env = "ray_actor_options.runtime_env.env_vars.CHATTERBOX_PROFILE_"
    out: dict = {}
    for stage, rows in zip(("t3", "s3gen"), min_batch.split(",")):
        out |= {f"{stage}.{env}DIR": str(folder.resolve()), f"{stage}.{env}STEPS": str(steps),
                f"{stage}.{env}MIN_BATCH": rows.strip()}
    return out


def upstream_checkpoint(a, ckpt_args: dict) -> str | None:
    """The checkpoint the app will load, as upstream should: --checkpoint, the deploy file's source, or
    CHATTERBOX_CHECKPOINT; None (random weights of the deploy file's preset) when none names one."""
    source = a.checkpoint or ckpt_args.get("source") or os.environ.get("CHATTERBOX_CHECKPOINT")
    return None if source == "random" else source


# -- main ---------------------------------------------------------------------------------------------------

def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one must not cut the teardown short
    raise SystemExit(128 + signum)   # unwinds through the finally blocks: the app is stopped, results written


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_sigterm)
    budget = Budget(a.max_wall_s)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    deploy, overrides = effective_config(a)
    config_path = out / f"{RESULT_NAME}_deploy.yaml"
    config_text = f"# {a.config} with the bench's overrides {overrides}\n" + yaml.safe_dump(deploy, sort_keys=False)
    config_path.write_text(config_text)
    args = app_args(deploy)
    router_settings = (args.get("router") or {}).get("settings") or {}

    monitor = GpuMonitor().start()
    result: dict = {
        "benchmark": RESULT_NAME,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"gpus": monitor.device_info(), "cpu": cpu_name(), "platform": platform.platform(),
                   "gpu_monitor": monitor.unavailable or "nvml"},
        "versions": versions(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "git_tree": working_tree_id(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config_file": a.config,
        "overrides": overrides,
        "config_yaml": config_text,
        "upstream": {"skipped": "--skip-upstream"} if a.skip_upstream else {},
        "app": {},
        "levels": [],
        "skipped_levels": [],
        "notes": [],
    }
    server: AppServer | None = None
    try:
        # 1. upstream, alone on the device
        if not a.skip_upstream:
            monitor.phase = "upstream"
            ckpt_args = args.get("checkpoint") or {}
            result["upstream"] = run_upstream(
                checkpoint=upstream_checkpoint(a, ckpt_args), preset=ckpt_args.get("preset", "full"), device=a.device,
                requests=a.upstream_requests, max_new_tokens=router_settings.get("max_new_tokens", 1000),
                seconds_per_char=a.seconds_per_char, watermark=a.watermark,
                out_json=out / f"{RESULT_NAME}_upstream.json", log_path=out / f"{RESULT_NAME}_upstream.log",
                timeout_s=min(a.upstream_max_s, 0.35 * budget.left()))
            log.info("upstream: %s", {k: v for k, v in result["upstream"].items() if k != "per_request"})
            write_results(result, out)

        # 2. the app
        monitor.phase = "app start"
        if a.server_url:
            base_url, metrics_url = a.server_url.rstrip("/"), a.metrics_url
        else:
            server = AppServer(config_path, log_path=out / f"{RESULT_NAME}_server.log", checkpoint=a.checkpoint,
                               port=a.port, ray_stop_force=a.ray_stop_force, watch=bool(a.variants))
            server.start()
            server.wait_ready(min(a.ready_timeout_s, max(30.0, budget.left())))
            base_url, metrics_url = server.base_url, server.metrics_url
        settings = httpx.get(f"{base_url}/v1/config", timeout=30).json()
        card = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]
        result["app"] = {
            "base_url": base_url, "metrics_url": metrics_url, "checkpoint": card.get("checkpoint"),
            "random_weights": card.get("random_weights"), "ready_after_s": server.ready_after_s if server else None,
            **{k: settings.get(k) for k in ("max_new_tokens", "max_seconds_per_char", "max_chunk_chars",
                                             "max_active_speech_requests", "first_chunk_tokens",
                                             "stream_chunk_tokens", "watermark")},
            "settings": settings,
        }
        up_path = result["upstream"].get("checkpoint")
        if up_path and up_path not in str(card.get("checkpoint")):
            result["notes"].append(f"upstream loaded {up_path}, the app {card.get('checkpoint')}: not the same weights")
        if not a.skip_upstream and settings.get("max_new_tokens") != router_settings.get("max_new_tokens", 1000):
            result["notes"].append(f"upstream capped at max_new_tokens={router_settings.get('max_new_tokens', 1000)}"
                                   f" but the app serves {settings.get('max_new_tokens')}")
        write_results(result, out)

        # 3. levels
        runner = LevelRunner(a, base_url, metrics_url, settings, monitor, APP_METRICS)

        def after_level() -> None:
            if server is not None:
                server.remember_tree()
            write_results(result, out)

        variants = None
        if a.variants:   # the deployed config first, then each variant's user_config on the same replicas
            variants = [("base", None)] + [
                (name, lambda uc=uc: server.apply_user_config(deploy, uc)) for name, uc in a.variants]
            result["variant_user_configs"] = {name: uc for name, uc in a.variants}
        asyncio.run(run_levels(a, runner, budget, result, after_level, variants))
    except BaseException as e:   # the results so far are still written below; SIGTERM and Ctrl-C re-raised
        log.exception("bench_system stopped early")
        result["error"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, Exception):
            raise
    finally:
        monitor.phase = "app stop"
        if server is not None:
            try:
                server.stop()
            except Exception:  # noqa: BLE001 - teardown goes on; the failure is in the log
                log.exception("stopping the app failed")
        monitor.stop()
        result["gpu_memory"] = monitor.to_json()
        result["gpu_peak_mib"] = max((s["total_used_mib"] for s in monitor.samples), default=None)
        result["wall_s"] = budget.elapsed()
        write_results(result, out, final=True)
        log.info("wrote %s (%.0f s)", out / f"{RESULT_NAME}.json", budget.elapsed())
    return 1 if result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
