"""`chatterbox-serve`: one entry point, a subcommand per job, `--help` on each."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Chatterbox TTS on Ray Serve: an OpenAI-compatible speech API with batched, quantized stages.",
    no_args_is_help=True,
    add_completion=False,
)


def _setup_logging() -> None:
    from serve_app.envs import get_envs

    logging.basicConfig(level=get_envs().log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.callback()
def _main() -> None:
    _setup_logging()


@app.command()
def serve(
    config: Path = typer.Option(Path("deploy/default.yaml"), "--config", "-c", help="Serve config YAML (deploy/*.yaml)."),
    host: str = typer.Option("127.0.0.1", help="HTTP host for the API."),
    port: int = typer.Option(8000, help="HTTP port for the API."),
    checkpoint: Optional[str] = typer.Option(None, help="Override the config's checkpoint: a folder, 'hub' or 'random'."),
    watch: bool = typer.Option(False, help="Deploy the config file again whenever it changes: S3Gen's user_config "
                               "(its deployments: entry) is applied to the running replicas, a change under args "
                               "restarts them."),
) -> None:
    """Start Ray Serve with the speech pipeline and block until Ctrl-C."""
    from serve_app.serving.launch.run import serve_main

    serve_main(config, host=host, port=port, checkpoint=checkpoint, watch=watch)


@app.command("make-checkpoint")
def make_checkpoint(
    path: Path = typer.Argument(..., help="Folder to write (created if needed)."),
    preset: str = typer.Option("tiny", help="'full' (the real architecture, ~3 GB) or 'tiny' (fast tests)."),
    multilingual: bool = typer.Option(False, help="Write the multilingual layout (t3_mtl23ls_v2.safetensors, ...)."),
    seed: int = typer.Option(0, help="Random seed of the weights."),
    overwrite: bool = typer.Option(False, help="Rewrite even if a checkpoint is already there."),
) -> None:
    """Write a random-weight checkpoint in exactly the upstream file layout."""
    from serve_app.model.checkpoint import write_random_checkpoint

    out = write_random_checkpoint(path, preset=preset, multilingual=multilingual, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {out}")


@app.command()
def plan(
    gpu_memory_gib: float = typer.Option(24.0, help="Memory of one GPU."),
    strategy: str = typer.Option("auto", help="Quantization strategy (see `quant estimate`)."),
    concurrency: int = typer.Option(32, help="Concurrent requests per T3 replica."),
) -> None:
    """Suggest how many replicas of each stage fit on one GPU, from the memory estimator."""
    from serve_app.planning import print_plan

    print_plan(gpu_memory_gib=gpu_memory_gib, strategy=strategy, concurrency=concurrency)


def _mount(name: str, module: str, help_text: str) -> None:
    """Sub-apps owned by other packages (quant/, bench/). They ship with this one, so one that does not import is
    a broken install, and says so, rather than a subcommand missing from --help."""
    import importlib

    try:
        sub = importlib.import_module(module).app
    except ImportError as e:
        raise ImportError(f"`chatterbox-serve {name}` ({module}) does not import: {e}; "
                          "reinstall the project (make setup)") from e
    app.add_typer(sub, name=name, help=help_text)


_mount("quant", "quant.cli", "Inspect, estimate and evaluate per-component quantization.")
_mount("bench", "bench.cli", "Run the benchmarks: t3, t3-attention, t3-host, s3gen, quant, profile-first-chunk (results go to bench/results/).")

if __name__ == "__main__":
    app()
