"""Every subcommand of the one entry point answers --help."""
from __future__ import annotations

import typer
from typer.testing import CliRunner

from serve_app.cli import app


def _command_paths(ty: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix + (c.name or c.callback.__name__.replace("_", "-"),) for c in ty.registered_commands]
    for group in ty.registered_groups:
        paths += _command_paths(group.typer_instance, prefix + (group.name,))
    return paths


def test_every_subcommand_has_help():
    runner = CliRunner()
    paths = _command_paths(app)
    assert {("serve",), ("make-checkpoint",), ("plan",)} <= set(paths)
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def test_unknown_command_fails():
    result = CliRunner().invoke(app, ["no-such-command"])
    assert result.exit_code != 0
