"""`chatterbox-serve quant ...`: inspect components, estimate memory per strategy, evaluate fidelity.

    quant inspect  [--preset full]                       Linear counts / params per component, what each strategy swaps
    quant estimate [--concurrency 1,8,32 --seq-len 1024]  replica memory table, strategies x concurrency
    quant eval     [--checkpoint DIR | --preset tiny]     fidelity table (T3 logits, flow mel) per strategy
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

app = typer.Typer(help="Inspect, estimate and evaluate per-component quantization.", no_args_is_help=True)
logger = logging.getLogger(__name__)

DEFAULT_STRATEGIES = "none,conservative,mixed,aggressive"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _component_keys(components: str) -> list[str]:
    from quant.components import COMPONENT_KEYS, S3GEN_KEYS, T3_KEYS

    groups = {"all": list(COMPONENT_KEYS), "t3": list(T3_KEYS), "s3gen": list(S3GEN_KEYS)}
    keys = [k for c in _split(components) for k in groups.get(c, [c])]
    unknown = [k for k in keys if k not in COMPONENT_KEYS]
    if unknown:
        raise typer.BadParameter(f"unknown component(s) {unknown}; use all, t3, s3gen or any of {list(COMPONENT_KEYS)}")
    return keys


@app.command()
def inspect(
    preset: str = typer.Option("full", help="Model preset whose architecture is counted (full | tiny)."),
    device: str = typer.Option("cuda", help="Device the strategies are resolved for (cuda | cpu)."),
    strategies: str = typer.Option(DEFAULT_STRATEGIES + ",dynamic", help="Comma-separated strategies to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Per component: parameters, Linear layers, and what each strategy would replace."""
    from quant.apply import is_skipped
    from quant.components import COMPONENTS
    from quant.estimator import MiB, component_weight_bytes, model_inventory
    from quant.strategies import named_strategy

    inv = model_inventory(preset)
    names = _split(strategies)
    plans = {n: named_strategy(n, device) for n in names}
    rows, out = [], {}
    for key, comp in COMPONENTS.items():
        c = inv.components[key]
        entry = {"params": c.num_params, "linear_layers": len(c.linears), "linear_params": c.num_linear_params,
                 "bnb_applies": comp.bnb_applies, "note": comp.note, "strategies": {}}
        row = [key, f"{c.num_params / 1e6:.1f}M", len(c.linears), f"{c.num_linear_params / max(c.num_params, 1):.0%}"]
        for n, specs in plans.items():
            spec = specs[key]
            swapped = 0 if spec.method == "none" else sum(1 for ln, *_ in c.linears if not is_skipped(ln, spec.skip))
            mib = component_weight_bytes(c, spec) / MiB
            entry["strategies"][n] = {"spec": spec.label(), "replaced": swapped, "weights_mib": round(mib, 1)}
            row.append(f"{spec.label()} x{swapped} {mib:.0f} MiB")
        out[key] = entry
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(markdown_table(["component", "params", "Linear", "in Linear", *names], rows))
    for key, comp in COMPONENTS.items():
        if not comp.bnb_applies:
            typer.echo(f"- {key}: {comp.note}")


@app.command()
def estimate(
    strategies: str = typer.Option(DEFAULT_STRATEGIES, help="Comma-separated strategies."),
    concurrency: str = typer.Option("1,8,32", help="Comma-separated numbers of concurrent requests (KV cache)."),
    batch_size: int = typer.Option(0, help="Requests computed at once, for activations (0: min(concurrency, 8))."),
    seq_len: int = typer.Option(1024, help="T3 tokens per request held in the KV cache."),
    components: str = typer.Option("all", help="What the replica holds: all, t3, s3gen, or component keys."),
    override: str = typer.Option("", help="Per-component overrides, e.g. 't3=int8,flow=none'."),
    preset: str = typer.Option("full", help="Model preset (full | tiny)."),
    ray_replica: bool = typer.Option(True, help="Count the CUDA context of a Ray replica (0.75 GiB) vs a process (0.6)."),
    budget_gib: float = typer.Option(0.0, help="If set, also print what `auto` picks at each concurrency."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Estimated GPU memory of one replica (MiB) for each strategy x concurrency."""
    from quant.estimator import GiB, MiB, estimate_replica
    from quant.strategies import auto_strategy_name, named_strategy, parse_quantization

    keys = _component_keys(components)
    overrides = parse_quantization("none," + override, "cuda")[1] if override else {}
    levels = [int(c) for c in _split(concurrency)]
    rows, out = [], []
    for name in _split(strategies):
        specs = {**named_strategy(name, "cuda"), **overrides}
        for n in levels:
            e = estimate_replica({k: specs[k] for k in keys}, preset=preset, num_requests=n, seq_len=seq_len,
                                 batch_size=batch_size or min(n, 8), ray_replica=ray_replica)
            out.append({"strategy": name, "concurrency": n, "batch_size": e.config["batch_size"], "weights_mib": e.weights_bytes / MiB,
                        "kv_cache_mib": e.kv_cache_bytes / MiB, "activations_mib": e.activation_bytes / MiB,
                        "total_mib": e.total_bytes / MiB, "per_component_mib": {k: v / MiB for k, v in e.weights.items()}})
            rows.append([name, n, e.weights_bytes / MiB, e.kv_cache_bytes / MiB, e.activation_bytes / MiB,
                         e.cuda_context_bytes / MiB, e.total_bytes / MiB])
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(markdown_table(["strategy", "requests", "weights", "kv_cache", "activations", "context", "total MiB"],
                              rows))
    if budget_gib:
        for n in levels:
            try:
                pick = auto_strategy_name("cuda", int(budget_gib * GiB), overrides, keys, n, seq_len)
            except ValueError as e:
                pick = f"none fits ({e})"
            typer.echo(f"auto @ {budget_gib:g} GiB, {n} request(s): {pick}")


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Option(None, help="Checkpoint folder in the upstream layout (default: random weights)."),
    preset: str = typer.Option("tiny", help="Preset for random weights when no --checkpoint is given."),
    strategies: str = typer.Option("conservative,mixed,aggressive", help="Comma-separated strategies."),
    device: str = typer.Option("cpu", help="cpu (fp32 reference) or cuda (bf16 reference)."),
    seed: int = typer.Option(0, help="Seed for inputs and the CFM noise."),
    seq_len: int = typer.Option(64, help="T3 teacher-forced positions."),
    num_tokens: int = typer.Option(40, help="Speech tokens fed to the S3Gen flow."),
    n_timesteps: int = typer.Option(10, help="CFM solver steps."),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    """Fidelity of each strategy against the float reference: T3 logits and S3Gen flow mel."""
    import torch

    from quant.cpu_layout import cpu_4bit_kernel
    from quant.fidelity import evaluate_specs
    from quant.strategies import resolve_strategy

    logging.basicConfig(level=logging.WARNING)
    if checkpoint is not None:
        from serve_app.model.loader import load_s3gen, load_t3, resolve_checkpoint

        info = resolve_checkpoint(str(checkpoint))
        t3, s3gen = load_t3(info), load_s3gen(info, enrollment=False)
        source = str(checkpoint)
    else:
        from serve_app.model.presets import build_s3gen, build_t3, get_preset

        torch.manual_seed(seed)
        t3, s3gen = build_t3(get_preset(preset)).eval(), build_s3gen(get_preset(preset)).eval()
        source = f"random {preset}"
    results, rows = {}, []
    for name in _split(strategies):
        res = evaluate_specs(resolve_strategy(name, device=device), t3=t3, s3gen=s3gen, device=device, seed=seed,
                             seq_len=seq_len, num_tokens=num_tokens, n_timesteps=n_timesteps)
        results[name] = res
        t, f = res.get("t3", {}), res.get("s3gen_flow", {})
        rows.append([name, t.get("spec"), t.get("rel_err"), t.get("kl"), t.get("top1"), t.get("topk"),
                     f.get("spec"), f.get("rel_l2"), f.get("lsd_db")])
    kernel = cpu_4bit_kernel() if torch.device(device).type == "cpu" else None
    typer.echo(f"fidelity vs float reference on {device} ({source}, seed {seed})"
               + (f"; 4-bit CPU kernel: {kernel} (generic for shapes it cannot pack)" if kernel else ""))
    typer.echo(markdown_table(["strategy", "t3 spec", "logit rel err", "KL", "top-1", "top-10", "flow spec",
                               "mel rel L2", "LSD dB"], rows))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"source": source, "device": device, "seed": seed, "cpu_4bit_kernel": kernel,
                                   "results": results}, indent=2))
        typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
