"""bench/fit_s3gen_steps.py: the line it fits, and that it runs on the committed results."""
from __future__ import annotations

import json

import pytest

from bench.fit_s3gen_steps import PADDED_KEYS_RUNS, RESULTS, RUNS, fit, main, points


def test_fit_recovers_a_known_line_and_its_ceiling():
    pts = [{"run": "r", "new_tokens": n, "step_s": 0.04 + 0.0005 * n} for n in (30, 200, 700, 1200)]
    pts.append({"run": "skip", "new_tokens": 100, "step_s": 9.0})
    f = fit(pts, exclude=("skip",))
    assert f["fixed_s"] == pytest.approx(0.04) and f["per_token_s"] == pytest.approx(0.0005)
    assert f["r2"] == pytest.approx(1.0) and f["points"] == 4
    assert f["ceiling_tokens_per_s"] == pytest.approx(2000) and f["ceiling_audio_s_per_s"] == pytest.approx(80)


def test_runs_on_the_committed_results(tmp_path):
    main(["--out", str(tmp_path)])
    result = json.loads((tmp_path / "s3gen_step_fit.json").read_text())
    padded = len(points(PADDED_KEYS_RUNS, RESULTS))
    assert len(result["points"]) == len(points(RUNS, RESULTS)) + padded and padded >= 8   # every streaming level
    assert result["fits"]["padded_keys T3 attention"]["points"] == padded
    assert set(result["fits"]) >= {"masked T3 attention, all runs"} and (tmp_path / "s3gen_step_fit.md").read_text().startswith("# S3Gen")
