"""Benchmark the fast T3 engine against upstream T3.inference on the same random weights.

    .venv/bin/python bench/bench_t3.py                 # H100: full preset, bf16 / int8@0 / nf4, 1..128 requests
    .venv/bin/python bench/bench_t3.py --smoke         # CPU: tiny preset, eager, two concurrency values

Upstream runs as upstream does (fp32, batch 1 with two CFG rows, eager HF forward with attentions and hidden
states) at one request with --upstream-tokens tokens; its stop check is disabled so token counts are fixed.
The engine runs every request to exactly --tokens sampled tokens (ignore_stop). Per concurrency it reports the
median decode step time (steps that admitted nobody), aggregate speech tokens/s over the whole run (prefill
included) and the peak VRAM of the engine. Results go to --out as JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.versions import versions as _versions  # noqa: E402
from serve_app.engine.t3 import T3Conditioning, T3Engine, T3EngineConfig, T3GenerationRequest  # noqa: E402
from serve_app.engine.t3.prompt import prompt_len  # noqa: E402

logger = logging.getLogger("bench_t3")

TEXT_TOKENS = list(range(20, 60))  # 40 text tokens, a typical sentence chunk
FIRST_BLOCK = 18   # the service's first token block: router first_chunk_tokens 15 + the flow's 3 look-ahead


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny preset on CPU, eager, small sizes")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random weights of --preset)")
    p.add_argument("--preset", default=None, help="model preset (default: full, or tiny with --smoke)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--concurrency", default=None, help="comma list (default 1,8,32,64,128; smoke 1,2)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per request (default 200; smoke 8)")
    p.add_argument("--upstream-tokens", type=int, default=None, help="upstream baseline tokens (default 100; smoke 6)")
    p.add_argument("--modes", default="bf16,int8,nf4,bf16-eager",
                   help="comma list of bf16 | fp16 | fp32 | int8 (threshold 0) | nf4 | fp4, each optionally with "
                        "'-eager' (no CUDA graphs) or '-compile' (torch.compile'd decode step, T3EngineConfig.compile)")
    p.add_argument("--no-upstream", action="store_true", help="skip the upstream baseline")
    p.add_argument("--enforce-eager", action="store_true", help="engine without CUDA graphs")
    p.add_argument("--out", default="bench/results", help="output directory")
    a = p.parse_args(argv)
    a.preset = a.preset or ("tiny" if a.smoke else "full")
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    a.concurrency = [int(c) for c in (a.concurrency or ("1,2" if a.smoke else "1,8,32,64,128")).split(",")]
    a.tokens = a.tokens or (8 if a.smoke else 200)
    a.upstream_tokens = a.upstream_tokens or (6 if a.smoke else 100)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if a.smoke:
        a.enforce_eager = True
        a.modes = [m for m in a.modes if not m.endswith("-eager")]  # smoke is eager throughout
    return a


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_cond(seed: int) -> T3Conditioning:
    g = torch.Generator().manual_seed(seed)
    return T3Conditioning(speaker_emb=torch.randn(1, 256, generator=g),
                          cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g))


def bench_upstream(t3_cpu, device, n_tokens) -> dict:
    """Upstream T3.inference, fp32, one request (two CFG rows), stop disabled."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    t3 = copy.deepcopy(t3_cpu).to(device)
    cond = make_cond(0)
    t3_cond = T3Cond(speaker_emb=cond.speaker_emb.to(device),
                     cond_prompt_speech_tokens=cond.cond_prompt_speech_tokens.to(device),
                     emotion_adv=0.5 * torch.ones(1, 1, 1, device=device))
    text = torch.tensor([[255, *TEXT_TOKENS, 0]] * 2, device=device)
    t3.hp.stop_speech_token = -1  # never stop: fixed token count (random weights)

    def run(n):
        sync(device)
        t0 = time.perf_counter()
        out = t3.inference(t3_cond=t3_cond, text_tokens=text, max_new_tokens=n, temperature=0.8, top_p=1.0,
                           cfg_weight=0.5)
        sync(device)
        return time.perf_counter() - t0, out.size(1)

    run(min(5, n_tokens))  # warm-up
    secs, n = run(n_tokens)
    first = statistics.median(run(1)[0] for _ in range(5))  # prefill + one sampled token
    del t3
    return {"tokens": n, "seconds": secs, "ms_per_token": 1e3 * secs / n, "tokens_per_s": n / secs,
            "first_token_ms": 1e3 * first}


def mode_config(mode: str):
    from quant.spec import QuantSpec

    mode = mode.removesuffix("-eager").removesuffix("-compile")
    if mode in ("bf16", "fp32", "fp16"):
        return mode, None
    if mode == "int8":
        return "bf16", QuantSpec(method="int8", dtype="bf16", int8_threshold=0.0)
    if mode in ("nf4", "fp4"):
        return "bf16", QuantSpec(method=mode, dtype="bf16")
    raise SystemExit(f"unknown mode {mode!r}; use bf16, fp32, fp16, int8 or nf4")


def run_concurrency(engine: T3Engine, c: int, n_tokens: int, tag: str) -> dict:
    reqs = [T3GenerationRequest(f"{tag}-{c}-{i}", TEXT_TOKENS, make_cond(i), seed=i, max_new_tokens=n_tokens,
                                ignore_stop=True) for i in range(c)]
    for r in reqs:
        engine.add_request(r)
    decode_ms, total_tokens, steps = [], 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        waiting_before = len(engine.scheduler.waiting)
        s0 = time.perf_counter()
        outs = engine.step()  # ends with the step's device->host copy: wall time is device time
        dt = time.perf_counter() - s0
        steps += 1
        # every sampled token counts (tokens >= 6561 are dropped from new_tokens but were decoded)
        if waiting_before == 0 and len(outs) == c:
            decode_ms.append(1e3 * dt)
    total = time.perf_counter() - t0
    total_tokens = c * n_tokens
    med = statistics.median(decode_ms) if decode_ms else float("nan")
    return {
        "concurrency": c, "tokens_per_request": n_tokens, "steps": steps, "seconds": total,
        "decode_steps_measured": len(decode_ms), "ms_per_step_median": med,
        "ms_per_step_p90": (sorted(decode_ms)[int(0.9 * (len(decode_ms) - 1))] if decode_ms else float("nan")),
        "tokens_per_s": total_tokens / total,
        "decode_tokens_per_s": c / (med / 1e3) if decode_ms else float("nan"),
    }


def first_token(engine: T3Engine, tag: str, repeats: int = 10, block: int = FIRST_BLOCK) -> dict:
    """One request arriving at an idle engine: ms until the step that admitted it returns its first token (prompt
    embeddings, prefill, first decode step, the step's host copy), and until `block` tokens (the service's first
    block); medians over `repeats`, all in one voice (as served: the engine caches a voice's conditioning
    embeddings). Also the prompt embeddings alone (synchronized), from scratch and with the voice's cached."""
    from serve_app.engine.t3.prompt import build_prompt_embeds, cond_embeds

    cond = make_cond(0)
    first, whole, embeds, embeds_cached = [], [], [], []
    for i in range(repeats):
        req = T3GenerationRequest(f"{tag}-first-{i}", TEXT_TOKENS, cond, seed=i, max_new_tokens=block,
                                  ignore_stop=True)
        for out, cached in ((embeds, None), (embeds_cached, cond_embeds(engine.t3, cond, req.exaggeration,
                                                                          engine.device, engine.dtype))):
            sync(engine.device)
            t0 = time.perf_counter()
            build_prompt_embeds(engine.t3, req.text_tokens, cond, req.exaggeration, engine.device, engine.dtype,
                                cond_emb=cached)
            sync(engine.device)
            out.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.add_request(req)
        engine.step()
        first.append(time.perf_counter() - t0)
        while engine.has_unfinished():
            engine.step()
        whole.append(time.perf_counter() - t0)
    return {"first_token_ms": 1e3 * statistics.median(first), "first_block_ms": 1e3 * statistics.median(whole),
            "block_tokens": block, "prompt_embeds_ms": 1e3 * statistics.median(embeds),
            "prompt_embeds_cached_ms": 1e3 * statistics.median(embeds_cached)}


def bench_engine(t3_cpu, mode: str, args, max_c: int) -> dict:
    dtype, quant = mode_config(mode)
    cuda = torch.device(args.device).type == "cuda"
    seq = prompt_len(len(TEXT_TOKENS)) + args.tokens
    max_seq_len = max(64, -(-seq // 64) * 64)
    cfg = T3EngineConfig(max_batch_requests=max_c, max_seq_len=max_seq_len, dtype=dtype, quant=quant,
                         enforce_eager=args.enforce_eager or mode.endswith("-eager"), device=args.device,
                         compile=mode.endswith("-compile"))
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # what earlier modes left behind is not this engine's
    t0 = time.perf_counter()
    engine = T3Engine(copy.deepcopy(t3_cpu), cfg)
    init_s = time.perf_counter() - t0
    run_concurrency(engine, 1, 4, f"warm-{mode}")  # warm-up: allocator, first prefill
    first = {"prefill_graphs": first_token(engine, mode) if engine.prefill_graphs is not None else None}
    graphs, engine.prefill_graphs = engine.prefill_graphs, None
    first["eager_prefill"] = first_token(engine, mode)
    engine.prefill_graphs = graphs
    logger.info("%s first token: %s", mode, first)
    results = []
    for c in args.concurrency:
        r = run_concurrency(engine, c, args.tokens, mode)
        logger.info("%s c=%d: %.2f ms/step, %.0f tokens/s", mode, c, r["ms_per_step_median"], r["tokens_per_s"])
        results.append(r)
    out = {
        "mode": mode, "dtype": dtype, "quant": None if quant is None else quant.label(),
        "config": {"max_batch_requests": cfg.max_batch_requests, "max_seq_len": cfg.max_seq_len,
                   "graph_batch_sizes": list(cfg.batch_buckets), "graph_seq_lens": list(cfg.seq_buckets),
                   "max_prefill_requests": cfg.max_prefill_requests, "enforce_eager": cfg.enforce_eager,
                   "decode_attention": cfg.attention, "compile": cfg.compile},
        "graphs": engine.use_graphs, "init_seconds": init_s, "first_token": first, "kv_cache_gib": engine.cache.num_bytes / 2**30,
        "peak_vram_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None,
        "results": results,
    }
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def versions() -> dict:
    return _versions("torch", "transformers", "bitsandbytes", "chatterbox-tts")


def to_markdown(report: dict) -> str:
    lines = [f"# T3 engine benchmark ({report['timestamp']})", "",
             f"device: {report['device']}; preset: {report['preset']}; tokens/request: {report['tokens']}; "
             f"versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}", ""]
    up = report.get("upstream")
    if up:
        lines += [f"upstream T3.inference (fp32, 1 request, {up['tokens']} tokens): "
                  f"**{up['ms_per_token']:.2f} ms/token**, {up['tokens_per_s']:.1f} tokens/s", ""]
    lines += ["| mode | graphs | requests | ms/step (median) | ms/step p90 | tokens/s (aggregate) | "
              "decode tokens/s | speed-up vs upstream ms/token | peak VRAM GiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in report["engine"]:
        vram = f"{m['peak_vram_gib']:.1f}" if m["peak_vram_gib"] is not None else "-"
        for r in m["results"]:
            speedup = f"{up['ms_per_token'] / r['ms_per_step_median']:.1f}x" if up and r["concurrency"] == 1 else ""
            lines.append(f"| {m['mode']} | {m['graphs']} | {r['concurrency']} | {r['ms_per_step_median']:.2f} | "
                         f"{r['ms_per_step_p90']:.2f} | {r['tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
                         f"{speedup} | {vram} |")
    lines += ["", "## First token (one request arriving at an idle engine, medians)", "",
              "| mode | prefill | prompt embeds ms (voice cached) | first token ms | first block ms (tokens) |",
              "|---|---|---|---|---|"]
    if up and up.get("first_token_ms"):
        lines.append(f"| upstream fp32 | eager (HF) | | {up['first_token_ms']:.1f} | |")
    for m in report["engine"]:
        for kind, ft in (m.get("first_token") or {}).items():
            if ft:
                cached = ft.get("prompt_embeds_cached_ms")
                cached = f" ({cached:.1f})" if cached is not None else ""
                lines.append(f"| {m['mode']} | {kind.replace('_', ' ')} | {ft['prompt_embeds_ms']:.1f}{cached} | "
                             f"{ft['first_token_ms']:.1f} | {ft['first_block_ms']:.1f} ({ft['block_tokens']}) |")
    lines += ["", "## Targets", ""]
    one = [(m["mode"], r["ms_per_step_median"]) for m in report["engine"] for r in m["results"]
           if r["concurrency"] == 1 and m["graphs"]]
    if up and one:
        mode, ms = min(one, key=lambda t: t[1])
        ok = up["ms_per_token"] / ms >= 8
        lines.append(f"- one request >= 8x fewer ms/token than upstream fp32: {up['ms_per_token']:.2f} / {ms:.2f} ms "
                     f"({mode}) = {up['ms_per_token'] / ms:.1f}x -> {'MET' if ok else 'NOT MET'}")
    nf4 = [r for m in report["engine"] if m["mode"] == "nf4" for r in m["results"] if r["concurrency"] == 128]
    if nf4:
        r = nf4[0]
        lines.append(f"- 128 requests nf4 >= 8,000 speech tokens/s: aggregate {r['tokens_per_s']:.0f}, decode "
                     f"{r['decode_tokens_per_s']:.0f} -> {'MET' if r['tokens_per_s'] >= 8000 else 'NOT MET'} (aggregate)")
    lines += ["", "ms/step: one decode step for all running requests (each gets one token), steps without "
              "admissions. tokens/s (aggregate): all requests' tokens over the run's wall time, prefill included."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; run with --smoke (CPU) or on a GPU")
    if args.smoke:
        torch.set_num_threads(1)
    from serve_app.model.loader import load_t3, resolve_checkpoint
    from serve_app.model.presets import build_t3, get_preset

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.checkpoint:
        t3_cpu = load_t3(resolve_checkpoint(args.checkpoint, preset=args.preset), "cpu").eval()
    else:
        t3_cpu = build_t3(get_preset(args.preset)).eval()
    logger.info("T3 (%s) ready in %.1f s", args.checkpoint or f"random {args.preset}", time.perf_counter() - t0)
    device_name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else platform.processor() or "cpu"
    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name,
        "preset": args.preset, "tokens": args.tokens, "concurrency": args.concurrency, "smoke": args.smoke,
        "versions": versions(), "upstream": None, "engine": [],
    }
    if not args.no_upstream:
        report["upstream"] = bench_upstream(t3_cpu, args.device, args.upstream_tokens)
        logger.info("upstream: %.2f ms/token", report["upstream"]["ms_per_token"])
    for mode in args.modes:
        report["engine"].append(bench_engine(t3_cpu, mode, args, max(args.concurrency)))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"t3_{'smoke' if args.smoke else args.preset}_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = to_markdown(report)
    (out / f"{stem}.md").write_text(md)
    logger.info("wrote %s/%s.{json,md}", out, stem)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
