"""`chatterbox-serve bench ...`: runs the benchmark scripts of bench/, each with its own flags.

    chatterbox-serve bench t3 --smoke                 same as python -m bench.bench_t3 --smoke
    chatterbox-serve bench s3gen --modes bf16 --batches 1,8
    chatterbox-serve bench quant --help               the script's own flags

Everything after the subcommand goes to the script's argument parser unchanged; the scripts import torch and
the models only when run, so `--help` here stays fast.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator

import typer

app = typer.Typer(help="Run the benchmarks (results go to bench/results/).", no_args_is_help=True,
                  add_completion=False)

# subcommand -> (module with main(argv), one line of help)
SCRIPTS: dict[str, tuple[str, str]] = {
    "t3": ("bench.bench_t3", "T3 engine: ms per decode step and speech tokens/s at 1-128 requests, vs upstream."),
    "s3gen": ("bench.bench_s3gen", "S3Gen engine: seconds of audio per second per batch and first-chunk time, "
                                   "vs upstream."),
    "t3-host": ("bench.bench_t3_host", "T3 stage host work around a stand-in engine: steps/s, hand-offs to the event "
                                       "loop, CPU per token (no GPU)."),
    "t3-attention": ("bench.bench_t3_attention", "T3 decode attention alone, masked against padded keys, at the "
                                                 "served shapes (CUDA)."),
    "quant": ("bench.bench_quant", "VRAM per component and strategy against the estimator; pre-quantized load time."),
    "profile-first-chunk": ("bench.profile_first_chunk", "Profile of S3Gen's first streamed chunk (a diagnostic)."),
}


@contextlib.contextmanager
def _prog(name: str) -> Iterator[None]:
    """argparse names the program after sys.argv[0]: make its usage line read `chatterbox-serve bench NAME`."""
    saved = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = f"chatterbox-serve bench {name}"
    try:
        yield
    finally:
        if sys.argv:
            sys.argv[0] = saved


def run_script(name: str, args: list[str]) -> int:
    """Run bench script `name` with `args`; returns its exit status."""
    module, _ = SCRIPTS[name]
    with _prog(name):
        try:
            result = importlib.import_module(module).main(args)
        except SystemExit as e:  # argparse (--help, a bad flag) and the scripts' own exits
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return result if isinstance(result, int) else 0


def _command(name: str, help_text: str) -> None:
    @app.command(name, help=f"{help_text} Flags: `chatterbox-serve bench {name} --help`.", add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _run(ctx: typer.Context) -> None:
        code = run_script(name, list(ctx.args))
        if code:
            raise typer.Exit(code)


for _name, (_module, _help) in SCRIPTS.items():
    _command(_name, _help)


if __name__ == "__main__":
    app()
