"""quant CLI: --help for each command, and inspect / estimate / eval on the tiny preset."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quant.cli import app, markdown_table

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["inspect"], ["estimate"], ["eval"]])
def test_help(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_inspect_tiny_json():
    r = runner.invoke(app, ["inspect", "--preset", "tiny", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["t3"]["linear_layers"] == 14 and out["t3"]["strategies"]["mixed"]["replaced"] == 14
    assert out["voice_encoder"]["bnb_applies"] is False
    assert out["t3"]["strategies"]["mixed"]["weights_mib"] < out["t3"]["strategies"]["none"]["weights_mib"]


def test_estimate_table():
    r = runner.invoke(app, ["estimate", "--concurrency", "1,4", "--components", "t3", "--budget-gib", "3"])
    assert r.exit_code == 0, r.output
    assert "| mixed | 4 |" in r.output and "auto @ 3 GiB, 1 request(s): none" in r.output
    bad = runner.invoke(app, ["estimate", "--components", "llm"])
    assert bad.exit_code != 0 and "unknown component" in bad.output


def test_eval_tiny(tmp_path):
    out = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", "--preset", "tiny", "--strategies", "conservative", "--seq-len", "8",
                            "--num-tokens", "8", "--n-timesteps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    res = report["results"]["conservative"]
    assert res["t3"]["rel_err"] < 0.05 and res["s3gen_flow"]["rel_l2"] < 0.1
    assert report["cpu_4bit_kernel"] in ("AVX512-BF16 packed", "generic")      # what the 4-bit numbers ran on
    assert f"4-bit CPU kernel: {report['cpu_4bit_kernel']}" in r.output


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 0.5]]) == "| a | b |\n|---|---|\n| 1 | 0.5 |"
