"""The system benchmark's markdown table and plots, from its result dict (the JSON it writes)."""
from __future__ import annotations

import logging
from pathlib import Path

from .measure import OPENING_S

log = logging.getLogger(__name__)

THROUGHPUT_PNG = "bench_system_throughput.png"
TTFA_PNG = "bench_system_ttfa.png"


def _f(x, spec: str = ".2f", scale: float = 1.0, none: str = "-") -> str:
    return none if x is None else format(x * scale, spec)


def _errors(level: dict) -> str:
    if not level.get("errors"):
        return "0"
    by = ", ".join(f"{k}: {v}" for k, v in level["errors_by_status"].items())
    return f"{level['errors']} ({by})"


def _variant_lines(result: dict) -> list[str]:
    """--variant: what each variant set, applied to the running S3Gen replicas after the levels before it."""
    configs = result.get("variant_user_configs") or {}
    if not configs:
        return []
    applied = result.get("variants") or {}
    parts = [f"`{name}` {uc}" + (f" (applied in {applied[name].get('seconds')} s; S3Gen pid "
                                  f"{applied[name].get('s3gen_pid_before')} -> {applied[name].get('s3gen_pid_after')})"
                                  if name in applied else " (not applied)")
             for name, uc in configs.items()]
    return ["Variants, in order (S3Gen's user_config set on the running replicas; [base] = as deployed): "
            + "; ".join(parts) + ".", ""]


def _load(level: dict) -> str:
    load = f"open {level['arrival_rate_per_s']:g}/s" if level.get("load") == "open" else str(level["concurrency"])
    return f"{load} [{level['variant']}]" if level.get("variant") else load


def markdown(result: dict) -> str:
    dev = result.get("device") or {}
    gpus = dev.get("gpus") or []
    device = ", ".join(f"{g['name']} ({g['memory_total_mib']} MiB, driver {g['driver']})" for g in gpus) or \
        dev.get("cpu", "CPU")
    v = result.get("versions", {})
    up = result.get("upstream") or {}
    up_rate = up.get("audio_s_per_s")
    app = result.get("app") or {}
    tree = f", files = tree {result['git_tree'][:12]}" if result.get("git_tree") else ""
    lines = [
        "# System benchmark (`bench/bench_system.py`)",
        "",
        f"{result.get('started_at', '')}; device: {device}; git {str(result.get('git_commit') or '?')[:12]}"
        f"{' (dirty)' if result.get('git_dirty') else ''}{tree}; torch {v.get('torch')}, ray {v.get('ray')}, "
        f"chatterbox-tts {v.get('chatterbox-tts')}.",
        "",
        f"App: `{result.get('config_file')}` with overrides `{result.get('overrides')}`; checkpoint "
        f"{app.get('checkpoint', '?')} (random weights: {app.get('random_weights')}); ready after "
        f"{_f(app.get('ready_after_s'), '.0f')} s. Token cap per text chunk: 2 s + "
        f"{app.get('max_seconds_per_char')} s per character (max {app.get('max_new_tokens')} tokens); "
        f"router admits {app.get('max_active_speech_requests')} speech requests at once.",
        "",
        *_variant_lines(result),
        "Upstream (`ChatterboxTTS`, sequential, same checkpoint and caps): "
        + (f"{_f(up_rate)} s of audio/s over {up.get('requests')} requests (e2e p50 {_f(up.get('e2e_p50_s'))} s)."
           if up_rate else f"not measured ({up.get('error') or up.get('skipped') or 'skipped'})."),
        "",
        "Audio s/s: seconds of audio received per second of wall time within the level's window (= x real time). "
        "TTFA: send to the first audio bytes (non-streaming: the whole file). Stall-free: streams a real-time "
        "player starting at the first byte never waits on. Length ok: OK responses whose audio fits the token cap. "
        "GPU peak: all processes, all GPUs (NVML, 1 s samples). GPU-ms per audio s: the stage's busy seconds "
        "(app metric, delta over the level) per second of audio made.",
        "",
        "| load | stream | requests | ok | errors | audio s/s | vs upstream | TTFA p50 / p95 / p99 s | e2e p50 s | "
        "stall-free | length ok | GPU peak MiB | T3 GPU-ms / audio s | S3Gen GPU-ms / audio s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in result.get("levels", []):
        stage = lv.get("stage_gpu_ms_per_audio_s") or {}
        lines.append(
            f"| {_load(lv)} | {'yes' if lv['stream'] else 'no'} | {lv['requests']} | {lv['ok']} | {_errors(lv)} | "
            f"{_f(lv.get('audio_s_per_s'), '.1f')} | "
            f"{_f(lv['audio_s_per_s'] / up_rate if up_rate and lv.get('audio_s_per_s') else None, '.1f')}x | "
            f"{_f(lv.get('ttfa_p50_s'))} / {_f(lv.get('ttfa_p95_s'))} / {_f(lv.get('ttfa_p99_s'))} | "
            f"{_f(lv.get('e2e_p50_s'))} | {_f(lv.get('stall_free_fraction'), '.1%')} | "
            f"{_f(lv.get('length_match_fraction'), '.0%')} | {lv.get('gpu_peak_mib') or '-'} | "
            f"{_f(stage.get('t3'), '.1f')} | {_f(stage.get('s3gen'), '.1f')} |")
    lines += _stall_lines(result.get("levels", []))
    lines += _finish_lines(result.get("levels", []))
    lines += _phases_table(result.get("levels", []))
    skipped = result.get("skipped_levels") or []
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{_load(s)} {'stream' if s['stream'] else 'no stream'} "
                                              f"({s['reason']})" for s in skipped) + "."]
    sources = {k: v for lv in result.get("levels", []) for k, v in (lv.get("stage_metric_sources") or {}).items()}
    if sources:
        lines += ["", "Stage busy time from: " + ", ".join(f"{k}: `{v}`" for k, v in sorted(sources.items())) + "."]
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def _finish_lines(levels: list[dict]) -> list[str]:
    """Text chunks by how T3 ended them, where the app exported it: what "length ok" below 100% is made of."""
    rows = []
    for lv in levels:
        by = (lv.get("engine") or {}).get("s3gen_chunks_by_finish") or {}
        if any(v for v in by.values()):
            rows.append(f"{_load(lv)} {'stream' if lv['stream'] else 'no stream'}: "
                        + ", ".join(f"{k} {int(v)}" for k, v in by.items() if v is not None))
    if not rows:
        return []
    return ["", "Text chunks by how T3 ended them (stop: it sampled its stop token, a short chunk by the model's "
            "choice that the length check counts against it; length: the token cap; incomplete: ended first): "
            + "; ".join(rows) + "."]


def _stall_lines(levels: list[dict]) -> list[str]:
    """One line per streaming level: how many streams stalled, where they first did, how often."""
    rows = [lv for lv in levels if lv["stream"] and lv.get("stall_streams")]
    if not rows:
        return []
    lines = ["", "Where streams stall (first late chunk #1: the one after the first chunk; played: audio played "
             "when the player first waited; after first audio: first chunk to the late chunk):", ""]
    for lv in rows:
        hist = lv.get("stall_first_chunk_index_hist") or {}
        name = str(lv.get("name") or _load(lv)).removesuffix("-stream")
        line = f"- {name}: {sum(hist.values())} of {lv['stall_streams']} streams stalled"
        if hist:
            line += ("; first late chunk " + ", ".join(f"#{k}: {v}" for k, v in hist.items())
                     + f"; played {_f(lv.get('stall_first_at_played_s_p50'), '.1f')} s (p50) when it first waited, "
                     f"{_f(lv.get('stall_first_after_first_audio_s_p50'), '.1f')} s after first audio; "
                     f"{_f(lv.get('stalls_per_stalled_stream_mean'), '.1f')} stalls each")
        n_open = lv.get("stall_streams_opening") or 0
        if hist and 0 < n_open < lv["stall_streams"]:
            line += (f"; stall-free {_f(lv.get('stall_free_opening'), '.1%')} of the {n_open} sent in the first "
                     f"{OPENING_S:g} s (the opening wave), {_f(lv.get('stall_free_after_opening'), '.1%')} of the "
                     f"{lv['stall_streams'] - n_open} after")
        lines.append(line + ".")
    return lines


def _phases_table(levels: list[dict]) -> list[str]:
    """Mean time to first audio by phase per streaming level (the app's chatterbox_first_audio_phase_seconds)."""
    rows = [(lv, (lv.get("engine") or {}).get("first_audio_phase_mean_s") or {}) for lv in levels if lv["stream"]]
    rows = [(lv, ph) for lv, ph in rows if any(v is not None for v in ph.values())]
    if not rows:
        return []
    phases = list(rows[0][1])
    return ["", "Time to first audio by phase, mean ms (S3Gen replica: voice conds, T3 until its first token block, "
            "waiting for the vocoder loop, the first step; router: the rest, HTTP to the first piece):", "",
            "| load | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)] + [
        f"| {_load(lv)} | " + " | ".join(_f(ph.get(p), '.0f', 1000.0) for p in phases) + " |" for lv, ph in rows]


def _concurrency_axis(ax, levels: list[dict]) -> None:
    """Log-2 x axis labelled with the measured concurrencies as plain numbers."""
    ax.set_xscale("log", base=2)
    ticks = sorted({lv["concurrency"] for lv in levels})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()


def plots(result: dict, out_dir: Path) -> list[str]:
    """Throughput and TTFA against concurrency (closed-loop levels; with --variant, the base variant's); -> the
    files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log.warning("no plots: %s", e)
        return []
    closed = [lv for lv in result.get("levels", []) if lv.get("load") == "closed" and lv.get("ok")
              and lv.get("variant") in (None, "base")]
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stream, style in ((True, "o-"), (False, "s--")):
        pts = sorted((lv["concurrency"], lv["audio_s_per_s"]) for lv in closed
                     if lv["stream"] == stream and lv.get("audio_s_per_s") is not None)
        if pts:
            ax.plot(*zip(*pts), style, label=f"served, {'streaming' if stream else 'non-streaming'}")
    up = (result.get("upstream") or {}).get("audio_s_per_s")
    if up:
        ax.axhline(up, color="gray", linestyle=":", label=f"upstream, sequential ({up:.3g})")
    _concurrency_axis(ax, closed)
    written.append(_save(plt, fig, ax, out_dir / THROUGHPUT_PNG, "concurrent requests (closed loop)",
                         "seconds of audio per second", "Throughput"))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    streams = sorted((lv for lv in closed if lv["stream"]), key=lambda lv: lv["concurrency"])
    for key, style in (("ttfa_p50_s", "o-"), ("ttfa_p95_s", "s--"), ("ttfa_p99_s", "^:")):
        pts = [(lv["concurrency"], lv[key]) for lv in streams if lv.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key.removeprefix("ttfa_").removesuffix("_s"))
    _concurrency_axis(ax, streams)
    written.append(_save(plt, fig, ax, out_dir / TTFA_PNG, "concurrent streams (closed loop)",
                         "time to first audio, s", "Time to first audio (streaming)"))
    return written


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    """Label, grid, legend, write and close one plot; -> its file name."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
