"""The entry point keeps the README's word: `--help` lists exactly the subcommands the README names, each answers
--help, and a sub-app that does not import is an error, not a missing subcommand."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from serve_app import cli
from serve_app.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"


def _command_paths(ty: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix + (c.name or c.callback.__name__.replace("_", "-"),) for c in ty.registered_commands]
    for group in ty.registered_groups:
        paths += _command_paths(group.typer_instance, prefix + (group.name,))
    return paths


def advertised_paths() -> set[tuple[str, ...]]:
    """The README's sentence "`chatterbox-serve --help` lists `serve`, ..., `quant` (`inspect | eval`) and ..."."""
    text = " ".join(README.read_text().split())
    sentence = re.search(r"`chatterbox-serve --help` lists (.*?); each has", text)
    assert sentence, "README lost its list of subcommands"
    paths = set()
    for name, subs in re.findall(r"`([\w-]+)`(?: \(`([^`]*)`\))?", sentence.group(1)):
        paths |= {(name, s.strip()) for s in subs.split("|")} if subs else {(name,)}
    return paths


def test_help_lists_what_the_readme_lists():
    assert set(_command_paths(app)) == advertised_paths()
    top = CliRunner().invoke(app, ["--help"])
    assert top.exit_code == 0
    for name in {p[0] for p in advertised_paths()}:
        assert name in top.output, top.output


@pytest.mark.parametrize("path", sorted(advertised_paths()), ids="-".join)
def test_every_advertised_subcommand_has_help(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, (path, result.output)
    assert "usage" in result.output.lower(), result.output


def test_bench_passes_flags_to_its_script(monkeypatch):
    import bench.bench_t3

    seen = []
    monkeypatch.setattr(bench.bench_t3, "main", lambda argv: seen.append(argv) or 3)
    result = CliRunner().invoke(app, ["bench", "t3", "--smoke", "--modes", "bf16", "--tokens=4"])
    assert seen == [["--smoke", "--modes", "bf16", "--tokens=4"]]
    assert result.exit_code == 3                                 # the script's status is the command's


def test_bench_help_is_the_scripts(capsys):
    from bench.cli import run_script

    assert run_script("quant", ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: chatterbox-serve bench quant" in out and "--smoke" in out


def test_a_sub_app_that_does_not_import_is_an_error():
    with pytest.raises(ImportError, match="chatterbox-serve nope.*does not import"):
        cli._mount("nope", "bench.no_such_module", "")


def test_unknown_command_fails():
    result = CliRunner().invoke(app, ["no-such-command"])
    assert result.exit_code != 0
