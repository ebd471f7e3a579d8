"""S3Gen's served step time as a line: fixed seconds a step + seconds per new speech token, fitted by least squares
over the streaming levels of committed `bench_system` runs (their exact per-level means: runs from `8c84d7e` on).

    python -m bench.fit_s3gen_steps            # -> bench/results/s3gen_step_fit.{json,md}

No GPU: it reads results. The inverse of the per-token cost is S3Gen's ceiling in new tokens per second of busy
time (25 a second of audio) under the conditions of those runs (T3 sharing the GPU under MPS), and that ceiling
bounds the system's audio seconds per second whatever the concurrency.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# runs whose level means are exact (counters of sums, not histogram midpoints): bench/README.md
RUNS = ("bench_system_prefill_graphs", "bench_system_light8", "bench_system_light8_deadline", "bench_system_a18e408",
        "bench_system_mps_ctl", "bench_system_mps_split", "bench_system_s3cap70", "bench_system_cover",
        "bench_system_451703c", "bench_system_step_v1")
# T3 decode attention reading each row's own keys (decode_attention padded_keys, from 8ba91dc the default): T3 takes
# less of the GPU, so S3Gen's steps are fitted apart
PADDED_KEYS_RUNS = ("bench_system_padded_keys", "bench_system")
SPEECH_TOKENS_PER_S = 25


def points(runs: tuple[str, ...], results: Path) -> list[dict]:
    """-> one point per streaming level: run, concurrency, step seconds, streams a step, new tokens a step."""
    out = []
    for run in runs:
        for lv in json.loads((results / f"{run}.json").read_text())["levels"]:
            e = lv.get("engine") or {}
            if lv["stream"] and e.get("s3gen_step_mean_s") and e.get("s3gen_new_tokens_per_step"):
                out.append({"run": run, "concurrency": lv["concurrency"], "step_s": e["s3gen_step_mean_s"],
                            "streams": e["s3gen_batch_mean"], "new_tokens": e["s3gen_new_tokens_per_step"],
                            "audio_s_per_s": lv["audio_s_per_s"]})
    return out


def fit(pts: list[dict], exclude: tuple[str, ...] = ()) -> dict:
    """step_s = fixed_s + per_token_s x new tokens, over the points not in `exclude` runs."""
    used = [p for p in pts if p["run"] not in exclude]
    X = np.array([[1.0, p["new_tokens"]] for p in used])            # [N, 2]
    y = np.array([p["step_s"] for p in used])                       # [N]
    (fixed, per_token), *_ = np.linalg.lstsq(X, y, rcond=None)
    pred = X @ np.array([fixed, per_token])
    r2 = 1.0 - float(((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return {"fixed_s": float(fixed), "per_token_s": float(per_token), "r2": r2, "points": len(used),
            "excluded_runs": list(exclude),
            "ceiling_tokens_per_s": 1.0 / per_token, "ceiling_audio_s_per_s": 1.0 / per_token / SPEECH_TOKENS_PER_S}


def markdown(result: dict) -> str:
    lines = ["# S3Gen served step time: fixed + per new token (`bench/fit_s3gen_steps.py`)", "",
             "Least squares over the streaming levels of committed `bench_system` runs (H200, MPS, random full "
             "weights); each point is one level's exact means. The inverse of the per-token cost is S3Gen's "
             "ceiling, in new speech tokens per second of busy time and in seconds of audio per second.", "",
             "| fit | points | fixed ms a step | ms per new token | R² | ceiling tokens/s | ceiling audio s/s |",
             "|---|---|---|---|---|---|---|"]
    for name, f in result["fits"].items():
        lines.append(f"| {name} | {f['points']} | {1e3 * f['fixed_s']:.1f} | {1e3 * f['per_token_s']:.3f} | "
                     f"{f['r2']:.3f} | {f['ceiling_tokens_per_s']:.0f} | {f['ceiling_audio_s_per_s']:.1f} |")
    lines += ["", "| run | streams | step ms (measured) | streams a step | new tokens a step | audio s/s |",
              "|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['run']} | {p['concurrency']} | {1e3 * p['step_s']:.0f} | {p['streams']:.1f} | "
                     f"{p['new_tokens']:.0f} | {p['audio_s_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    pts = points(RUNS, a.results)
    padded = points(PADDED_KEYS_RUNS, a.results)
    result = {"runs": list(RUNS) + list(PADDED_KEYS_RUNS), "points": pts + padded, "fits": {
        "masked T3 attention, all runs": fit(pts),
        # T3 held to 30% of the SMs: S3Gen ran with little of T3's kernels beside it
        "without the SM-capped run": fit(pts, exclude=("bench_system_mps_split",)),
        "the SM-capped run alone": fit([p for p in pts if p["run"] == "bench_system_mps_split"]),
        "padded_keys T3 attention": fit(padded),
    }}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "s3gen_step_fit.json").write_text(json.dumps(result, indent=2))
    (a.out / "s3gen_step_fit.md").write_text(markdown(result))
    print(markdown(result).split("\n\n")[2])


if __name__ == "__main__":
    main()
