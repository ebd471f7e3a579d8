"""Benchmark the S3Gen engine (speech tokens -> 24 kHz audio) against upstream S3Gen.inference, same weights.

    python -m bench.bench_s3gen                      # GPU: full preset, fp32 / bf16 / int8 flow, batch 1..64
    python -m bench.bench_s3gen --smoke              # CPU: tiny preset, 2 CFM steps, batch 1,2

Upstream runs as upstream does (fp32, one request at a time, 10 CFM steps). The engine runs each mode at each
batch size on requests of ~--tokens speech tokens (+-10%, so rows are padded) with the checkpoint's built-in
voice (or a random 150-token prompt). Reported: seconds of audio per second of wall time, peak VRAM, the
vocoder time to the first streamed chunk (first --stream-chunk tokens of a stream), HiFT's share, and each
mode's distance from the fp32 engine (log-spectral distance, dB) on the same request. JSON + markdown to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.versions import versions as _versions  # noqa: E402
from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig, VocodeInput  # noqa: E402

logger = logging.getLogger("bench_s3gen")
SR = 24_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny preset on CPU, small sizes")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random weights of --preset)")
    p.add_argument("--preset", default=None, help="random-weight preset (default full; smoke tiny)")
    p.add_argument("--device", default=None, help="default cuda; smoke cpu")
    p.add_argument("--batches", default=None, help="comma list (default 1,8,32,64; smoke 1,2)")
    p.add_argument("--tokens", type=int, default=None, help="speech tokens per request (default 150; smoke 12)")
    p.add_argument("--steps", type=int, default=None, help="CFM steps (default 10; smoke 2)")
    p.add_argument("--modes", default=None,
                   help="comma list of fp32 | bf16 | fp16 | int8 (bnb, threshold 0, bf16) | int8-t6 | "
                        "dynamic_int8 | bf16-hift (bf16 estimator and HiFT) | bf16-compile (torch.compile estimator) | "
                        "bf16-enc32 (flow encoder fp32) | bf16-compile-static (estimator compiled per shape) | "
                        "bf16-upstream-est (upstream estimator forward) | bf16-eager (no CUDA graphs). "
                        "Default fp32,bf16,int8,bf16-hift; "
                        "smoke fp32,bf16")
    p.add_argument("--stream-chunk", type=int, default=None, help="tokens in the first streamed chunk (default 25)")
    p.add_argument("--first-chunk-reps", type=int, default=20, help="timed first chunks (median, min, p90)")
    p.add_argument("--upstream-requests", type=int, default=None, help="upstream timed requests (default 3)")
    p.add_argument("--no-upstream", action="store_true")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="", help="suffix of the result files (bench_s3gen_<tag>.json / .md)")
    a = p.parse_args(argv)
    a.preset = a.preset or ("tiny" if a.smoke else "full")
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    a.batches = [int(b) for b in (a.batches or ("1,2" if a.smoke else "1,8,32,64")).split(",")]
    a.tokens = a.tokens or (12 if a.smoke else 150)
    a.steps = a.steps or (2 if a.smoke else 10)
    a.modes = [m.strip() for m in (a.modes or ("fp32,bf16" if a.smoke else "fp32,bf16,int8,bf16-hift")).split(",")]
    a.stream_chunk = a.stream_chunk or (8 if a.smoke else 25)
    a.upstream_requests = a.upstream_requests or (1 if a.smoke else 3)
    return a


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def load_model(a):
    """-> (fp32 S3Gen on device, gen dict of a voice on device)."""
    from serve_app.model.loader import load_builtin_conds, load_s3gen, resolve_checkpoint

    info = resolve_checkpoint(a.checkpoint or "random", preset=a.preset)
    s3gen = load_s3gen(info, a.device, enrollment=False)
    conds = load_builtin_conds(info, a.device)
    if conds is not None:
        gen = conds.gen
    else:
        g = torch.Generator().manual_seed(0)
        P = 150 if not a.smoke else 10
        gen = dict(prompt_token=torch.randint(0, 6561, (1, P), generator=g), prompt_token_len=torch.tensor([P]),
                   prompt_feat=torch.randn(1, 2 * P, 80, generator=g) - 5, prompt_feat_len=None,
                   embedding=torch.randn(1, 192, generator=g))
    gen = {k: (v.to(a.device) if torch.is_tensor(v) else v) for k, v in gen.items()}
    return s3gen, gen, str(info.path)


def requests(a, n: int, gen: dict) -> list[VocodeInput]:
    rng = np.random.default_rng(n)
    out = []
    for i in range(n):
        T = int(a.tokens * rng.uniform(0.9, 1.1))
        out.append(VocodeInput(rng.integers(0, 6561, T), gen, seed=i))
    return out


def engine_config(a, mode: str) -> S3GenEngineConfig:
    kw: dict = dict(device=a.device, n_cfm_timesteps=a.steps)
    if mode in ("fp32", "bf16", "fp16"):
        kw["dtype"] = mode
    elif mode == "bf16-compile":
        kw.update(dtype="bf16", compile=True)
    elif mode == "bf16-compile-all":    # the estimator and HiFT's trunk compiled
        kw.update(dtype="bf16", compile=True, compile_hift=True)
    elif mode == "bf16-enc32":          # the flow encoder in fp32 (the bf16 default runs it in bf16)
        kw.update(dtype="bf16", encoder_dtype="fp32")
    elif mode == "bf16-compile-static":  # estimator compiled per shape (the previous default)
        kw.update(dtype="bf16", compile=True, compile_dynamic=False)
    elif mode == "bf16-upstream-est":   # upstream's estimator forward (no FastEstimator), graphs as usual
        kw.update(dtype="bf16", fast_estimator=False)
    elif mode == "bf16-eager":          # no CUDA graphs at all
        kw.update(dtype="bf16", enforce_eager=True)
    elif mode == "bf16-hift":
        kw.update(dtype="bf16", hift_dtype="bf16")
    elif mode in ("int8", "int8-t6", "dynamic_int8"):
        from quant.spec import QuantSpec

        if mode == "dynamic_int8":
            kw.update(dtype="fp32", quant=QuantSpec(method="dynamic_int8", dtype="fp32"))
        else:
            kw.update(dtype="bf16", quant=QuantSpec(method="int8", dtype="bf16",
                                                    int8_threshold=6.0 if mode == "int8-t6" else 0.0))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return S3GenEngineConfig(**kw)


def bench_upstream(a, s3gen, gen) -> dict:
    reqs = requests(a, a.upstream_requests + 1, gen)
    times, audio = [], 0.0
    for i, r in enumerate(reqs):
        tok = torch.as_tensor(r.speech_tokens, device=a.device)[None]
        sync(a.device)
        t0 = time.perf_counter()
        wav, _ = s3gen.inference(speech_tokens=tok, ref_dict=dict(gen), n_cfm_timesteps=a.steps)
        sync(a.device)
        if i > 0:  # the first is warm-up
            times.append(time.perf_counter() - t0)
            audio += wav.shape[-1] / SR
    return dict(requests=len(times), seconds=sum(times), audio_seconds=audio, audio_s_per_s=audio / sum(times))


def bench_mode(a, base, gen, mode: str, ref_audio: np.ndarray | None) -> dict:
    s3gen = copy.deepcopy(base)
    cuda = torch.device(a.device).type == "cuda"
    eng = S3GenEngine(s3gen, engine_config(a, mode))
    gen = eng.prepare_conds(gen)   # as a replica's voice cache holds it
    res: dict = dict(mode=mode, quantized_linears=len(eng.quantized), batches={})
    t0 = time.perf_counter()
    eng.vocode(requests(a, min(8, max(a.batches)), gen))  # warm-up (kernels, noise buffers; compiles)
    # first streamed chunk: vocoder time of the first step of a stream (flow on prompt + chunk, HiFT, fades)
    tok = requests(a, 1, gen)[0].speech_tokens[:a.stream_chunk]
    for _ in range(eng.config.graph_capture_after):
        eng.vocode_stream_step(tok, gen, None, finalize=False, seed=0)   # untimed: capture
    res["warmup_seconds"] = time.perf_counter() - t0
    firsts = []
    for _ in range(a.first_chunk_reps):
        sync(a.device)
        t0 = time.perf_counter()
        audio, _ = eng.vocode_stream_step(tok, gen, None, finalize=False, seed=0)
        sync(a.device)
        firsts.append(time.perf_counter() - t0)
    firsts.sort()
    res["first_chunk"] = dict(tokens=len(tok), seconds=statistics.median(firsts), audio_seconds=audio.size / SR,
                              min_seconds=firsts[0], p90_seconds=firsts[int(0.9 * (len(firsts) - 1))],
                              reps=len(firsts))
    # where the first chunk's time goes: the flow (encoder + euler loop) and HiFT, each alone, as the step runs them
    from serve_app.engine.s3gen.config import VocodeInput
    from serve_app.engine.s3gen.vocoder import HiftRow

    row = eng._row(VocodeInput(tok, gen, 0, finalize=False), False)
    padded = -(-row.num_tokens // eng.config.length_bucket) * eng.config.length_bucket
    mel = eng.flow([row], padded, a.steps)[0]
    parts = {}
    for name, fn in (("flow", lambda: eng.flow([row], padded, a.steps)),
                     ("hift", lambda: eng.hift([HiftRow(mel, 0, phase_at=eng._phase_at(
                         VocodeInput(tok, gen, 0, finalize=False), mel.shape[1], 0))]))):
        ts = []
        for _ in range(max(3, a.first_chunk_reps // 2)):
            sync(a.device)
            t0 = time.perf_counter()
            fn()
            sync(a.device)
            ts.append(time.perf_counter() - t0)
        parts[name] = statistics.median(ts)
    res["first_chunk"]["parts_seconds"] = parts
    logger.info("%s first chunk %.1f ms (min %.1f, p90 %.1f; warm-up %.0f s): %s", mode,
                1e3 * res["first_chunk"]["seconds"], 1e3 * firsts[0], 1e3 * res["first_chunk"]["p90_seconds"],
                res["warmup_seconds"], {k: round(1e3 * v, 1) for k, v in parts.items()})
    for b in a.batches:
        reqs = requests(a, b, gen)
        for _ in range(eng.config.graph_capture_after):
            eng.vocode(reqs)  # untimed: until this shape's CUDA graph is captured (a server does it once a shape)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = 2 if b <= 8 else 1
        times = []
        for _ in range(runs):
            sync(a.device)
            t0 = time.perf_counter()
            wavs = eng.vocode(reqs)
            sync(a.device)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        audio = sum(w.size for w in wavs) / SR
        res["batches"][b] = dict(seconds=t, audio_seconds=audio, audio_s_per_s=audio / t,
                                 peak_vram_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
        logger.info("%s batch %d: %.3f s for %.2f s of audio = %.2f s/s", mode, b, t, audio, audio / t)
    # HiFT alone on the biggest batch's mels (its share of the work)
    big = requests(a, max(a.batches), gen)
    rows = [eng._row(r, True) for r in big[: min(32, len(big))]]
    mels = [torch.randn(80, 2 * r.tokens.shape[0], device=a.device) - 5 for r in rows]
    from serve_app.engine.s3gen.vocoder import HiftRow

    eng.hift([HiftRow(m, 0) for m in mels[:2]])
    sync(a.device)
    t0 = time.perf_counter()
    eng.hift([HiftRow(m, i) for i, m in enumerate(mels)])
    sync(a.device)
    res["hift"] = dict(batch=len(mels), seconds=time.perf_counter() - t0,
                       audio_seconds=sum(m.shape[1] for m in mels) * 480 / SR)
    # distance from the fp32 engine on the same request and seed
    one = eng.vocode(requests(a, 1, gen))[0]
    if ref_audio is not None:
        from serve_app.engine.s3gen.quality import log_spectral_distance

        res["lsd_vs_fp32_db"] = log_spectral_distance(one, ref_audio)
        res["max_abs_diff_vs_fp32"] = float(np.abs(one - ref_audio).max())
    res["_audio"] = one
    del eng, s3gen
    if cuda:
        torch.cuda.empty_cache()
    return res


def estimator_kernels(a, base, gen) -> dict:
    """CUDA kernels and their summed GPU time in one bf16 estimator call at the first chunk's shape (2 CFG rows),
    upstream forward vs FastEstimator (torch.profiler, eager)."""
    from torch.profiler import ProfilerActivity, profile

    from serve_app.engine.s3gen.estimator import FastEstimator
    from serve_app.engine.s3gen.flow import use_sync_free_masks

    use_sync_free_masks()
    est = copy.deepcopy(base.flow.decoder.estimator).to(torch.bfloat16)
    T = 2 * (int(gen["prompt_token"].shape[-1]) + a.stream_chunk)
    T = -(-T // 64) * 64
    g = torch.Generator(device=a.device).manual_seed(0)
    x, mu, cond = (torch.randn(2, 80, T, device=a.device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 1, T, device=a.device, dtype=torch.bfloat16)
    t = torch.full((2,), 0.3, device=a.device, dtype=torch.bfloat16)
    spks = torch.randn(2, 80, device=a.device, dtype=torch.bfloat16)
    out = {"frames": T}
    with torch.inference_mode():
        for name, fn in (("upstream", est), ("fast", FastEstimator(est))):
            for _ in range(3):
                fn(x, mask, mu, t, spks, cond)
            sync(a.device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(x, mask, mu, t, spks, cond)
                sync(a.device)
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            out[name] = dict(kernels=len(kernels),
                             gpu_ms=sum(e.device_time for e in kernels) / 1e3)
    logger.info("estimator kernels per call: %s", out)
    return out


def versions() -> dict:
    return _versions("torch", "chatterbox-tts", "bitsandbytes", "diffusers", "torchaudio")


def markdown(report: dict) -> str:
    lines = [f"# S3Gen engine benchmark ({report['device']}, {report['created']})", "",
             f"config: {json.dumps(report['config'])}", "", f"versions: {json.dumps(report['versions'])}", ""]
    up = report.get("upstream")
    if up:
        lines += [f"upstream `S3Gen.inference` fp32, one at a time: **{up['audio_s_per_s']:.1f} s of audio/s** "
                  f"({up['requests']} requests, {up['seconds']:.2f} s)", ""]
    batches = report["config"]["batches"]
    lines.append("| mode | " + " | ".join(f"batch {b} audio s/s (peak GB)" for b in batches)
                 + " | first chunk ms: median [min, p90] (flow/HiFT alone) | HiFT s/s | LSD vs fp32 dB | warm-up s |")
    lines.append("|---" * (len(batches) + 5) + "|")
    for r in report["modes"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error'][:120]} |")
            continue
        cells = []
        for b in batches:
            x = r["batches"][b]
            gb = f" ({x['peak_vram_gb']:.1f})" if x["peak_vram_gb"] is not None else ""
            cells.append(f"{x['audio_s_per_s']:.1f}{gb}")
        h = r["hift"]
        lsd = r.get("lsd_vs_fp32_db")
        fc = r["first_chunk"]
        split = "/".join(f"{1000 * fc.get('parts_seconds', {}).get(k, float('nan')):.1f}" for k in ("flow", "hift"))
        spread = f" [{1000 * fc['min_seconds']:.1f}, {1000 * fc['p90_seconds']:.1f}]" if "min_seconds" in fc else ""
        warm = r.get("warmup_seconds")
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + f" | {1000 * fc['seconds']:.1f}{spread} ({split}) | "
                     f"{h['audio_seconds'] / h['seconds']:.0f} | {'' if lsd is None else f'{lsd:.2f}'} | "
                     f"{'' if warm is None else f'{warm:.0f}'} |")
    ek = report.get("estimator_kernels")
    if ek and "fast" in ek:
        lines += ["", f"One bf16 estimator call at the first chunk's shape (2 CFG rows x {ek['frames']} frames), eager: "
                  f"upstream forward {ek['upstream']['kernels']} CUDA kernels ({ek['upstream']['gpu_ms']:.2f} ms of GPU time), "
                  f"FastEstimator {ek['fast']['kernels']} ({ek['fast']['gpu_ms']:.2f} ms)."]
    lines += ["", "Targets (H100): >= 150 s of audio/s at batch 32; first streamed chunk <= 40 ms of vocoder time."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a = parse_args(argv)
    if a.smoke:
        torch.set_num_threads(1)  # a shared small CPU box: intra-op threads only spin
    torch.manual_seed(0)
    base, gen, ckpt = load_model(a)
    device = torch.cuda.get_device_name() if torch.device(a.device).type == "cuda" else platform.processor() or "cpu"
    report: dict = dict(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device,
                        versions=versions(), checkpoint=ckpt,
                        config=dict(preset=a.preset, tokens=a.tokens, steps=a.steps, batches=a.batches,
                                    modes=a.modes, stream_chunk=a.stream_chunk,
                                    prompt_tokens=int(gen["prompt_token"].shape[-1]), smoke=a.smoke))
    if not a.no_upstream:
        report["upstream"] = bench_upstream(a, base, gen)
        logger.info("upstream: %.2f s of audio/s", report["upstream"]["audio_s_per_s"])
    if torch.device(a.device).type == "cuda":
        try:
            report["estimator_kernels"] = estimator_kernels(a, base, gen)
        except Exception as e:  # the profiler is a nice-to-have
            logger.exception("kernel count failed")
            report["estimator_kernels"] = dict(error=f"{type(e).__name__}: {e}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_s3gen" + ("_smoke" if a.smoke else "") + (f"_{a.tag}" if a.tag else "")

    def write():  # after every mode: a run cut short (device time, a hang) keeps what it measured
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
        (out / f"{stem}.md").write_text(markdown(report))

    report["modes"], ref = [], None
    for mode in a.modes:
        try:
            r = bench_mode(a, base, gen, mode, ref)
            if mode == "fp32":
                ref = r["_audio"]
            r.pop("_audio")
        except Exception as e:  # one broken mode (e.g. bnb missing) must not lose the others
            logger.exception("mode %s failed", mode)
            r = dict(mode=mode, error=f"{type(e).__name__}: {e}")
        report["modes"].append(r)
        write()
    write()
    sys.stdout.write(markdown(report))
    return report


if __name__ == "__main__":
    main()
