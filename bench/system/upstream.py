"""The upstream baseline: chatterbox-tts `ChatterboxTTS`, one request at a time, on the same checkpoint, texts
and token caps as the served app. Runs in its own process (`python -m bench.system.upstream ...`, started by
`run_upstream`) before the app starts, so the two never share the GPU and its memory is returned on exit.

Upstream's `generate` hard-codes `max_new_tokens=1000`, and random weights never emit the stop token, so
`generate_capped` repeats generate's steps (punc_norm, tokenize, CFG rows, `T3.inference`, drop invalid tokens,
`S3Gen.inference`, watermark) with the app's per-chunk cap. A full checkpoint loads through upstream's own
`ChatterboxTTS.from_local`; a tiny one (smoke) through serve_app's loader, which builds the smaller modules.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.system.texts import capped_tokens, text_for  # noqa: E402

log = logging.getLogger("bench_system.upstream")
SR = 24_000


class _NoWatermark:
    def __init__(self, *args, **kwargs):
        pass

    def apply_watermark(self, wav, sample_rate):  # perth's signature
        return wav


def load_tts(checkpoint: str | None, preset: str, device: str, watermark: bool):
    """-> (upstream ChatterboxTTS, how it was loaded, checkpoint folder)."""
    import chatterbox.tts as upstream

    from serve_app.model.loader import load_upstream_tts, resolve_checkpoint

    if not watermark:   # Perth's model files are not in the GPU wheel bundle: never build its watermarker
        upstream.perth = SimpleNamespace(PerthImplicitWatermarker=_NoWatermark)
    info = resolve_checkpoint(checkpoint or "random", preset=preset)
    if info.preset == "full" and not info.multilingual:
        return upstream.ChatterboxTTS.from_local(info.path, device), "ChatterboxTTS.from_local", str(info.path)
    return load_upstream_tts(info, device, watermark=watermark), "serve_app.model.loader.load_upstream_tts", \
        str(info.path)


def generate_capped(tts, text: str, max_new_tokens: int, seed: int, *, exaggeration: float = 0.5,
                    cfg_weight: float = 0.5, temperature: float = 0.8):
    """Upstream `ChatterboxTTS.generate(text)` with `max_new_tokens` in place of its fixed 1000.
    -> (audio float32 [N] at 24 kHz, number of speech tokens vocoded)."""
    import torch
    import torch.nn.functional as F
    from chatterbox.models.s3tokenizer import drop_invalid_tokens
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import punc_norm

    torch.manual_seed(seed)
    if exaggeration != tts.conds.t3.emotion_adv[0, 0, 0]:
        c = tts.conds.t3
        tts.conds.t3 = T3Cond(speaker_emb=c.speaker_emb, cond_prompt_speech_tokens=c.cond_prompt_speech_tokens,
                              emotion_adv=exaggeration * torch.ones(1, 1, 1)).to(device=tts.device)
    text_tokens = tts.tokenizer.text_to_tokens(punc_norm(text)).to(tts.device)   # [1, L]
    if cfg_weight > 0.0:
        text_tokens = torch.cat([text_tokens, text_tokens], dim=0)              # [2, L]: CFG rows
    text_tokens = F.pad(text_tokens, (1, 0), value=tts.t3.hp.start_text_token)
    text_tokens = F.pad(text_tokens, (0, 1), value=tts.t3.hp.stop_text_token)
    with torch.inference_mode():
        speech_tokens = tts.t3.inference(t3_cond=tts.conds.t3, text_tokens=text_tokens,
                                         max_new_tokens=max_new_tokens, temperature=temperature,
                                         cfg_weight=cfg_weight, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
        speech_tokens = drop_invalid_tokens(speech_tokens[0])
        speech_tokens = speech_tokens[speech_tokens < 6561].to(tts.device)      # [T]
        wav, _ = tts.s3gen.inference(speech_tokens=speech_tokens, ref_dict=tts.conds.gen)
        wav = wav.squeeze(0).detach().cpu().numpy()
        wav = tts.watermarker.apply_watermark(wav, sample_rate=tts.sr)
    return wav, int(speech_tokens.numel())


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(a) -> dict:
    t0 = time.perf_counter()
    tts, loader, path = load_tts(a.checkpoint, a.preset, a.device, a.watermark)
    load_s = time.perf_counter() - t0
    started = time.perf_counter()
    rows = []
    for i in range(a.requests + 1):   # request 0 is the warm-up
        if i > 0 and time.perf_counter() - started > a.max_s:
            log.warning("upstream: %d of %d requests done within --max-s %.0f", i - 1, a.requests, a.max_s)
            break
        text = text_for(i)
        cap = capped_tokens(len(text), a.max_new_tokens, a.seconds_per_char)
        _sync(a.device)
        t = time.perf_counter()
        wav, num_tokens = generate_capped(tts, text, cap, seed=i)
        _sync(a.device)
        row = {"index": i, "chars": len(text), "cap_tokens": cap, "speech_tokens": num_tokens,
               "audio_s": wav.size / SR, "seconds": time.perf_counter() - t, "warmup": i == 0}
        rows.append(row)
        log.info("upstream %d: %d chars, %d/%d tokens, %.2f s audio in %.2f s", i, row["chars"], num_tokens, cap,
                 row["audio_s"], row["seconds"])
    timed = [r for r in rows if not r["warmup"]]
    seconds = sum(r["seconds"] for r in timed)
    audio = sum(r["audio_s"] for r in timed)
    return {"requests": len(timed), "seconds": seconds, "audio_seconds": audio,
            "audio_s_per_s": audio / seconds if seconds > 0 else None,
            "e2e_p50_s": sorted(r["seconds"] for r in timed)[len(timed) // 2] if timed else None,
            "load_s": load_s, "loader": loader, "checkpoint": path, "device": a.device, "watermark": a.watermark,
            "max_new_tokens": a.max_new_tokens, "max_seconds_per_char": a.seconds_per_char, "per_request": rows}


def run_upstream(*, checkpoint: str | None, preset: str, device: str, requests: int, max_new_tokens: int,
                 seconds_per_char: float, watermark: bool, out_json: Path, log_path: Path,
                 timeout_s: float) -> dict:
    """Runs the baseline in a child process; -> its result, or {"error": ...} (never raises)."""
    cmd = [sys.executable, "-m", "bench.system.upstream", "--preset", preset, "--device", device,
           "--requests", str(requests), "--max-new-tokens", str(max_new_tokens),
           "--seconds-per-char", str(seconds_per_char), "--max-s", str(max(10.0, timeout_s - 90)),
           "--out", str(out_json)]
    cmd += (["--checkpoint", checkpoint] if checkpoint else []) + (["--watermark"] if watermark else [])
    log.info("upstream baseline: %s", " ".join(cmd))
    t0 = time.monotonic()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return {"error": f"timed out after {timeout_s:.0f} s (see {log_path.name})"}
        except BaseException:   # the bench itself stopped (SIGTERM, Ctrl-C): take the child along
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    if rc != 0 or not out_json.exists():
        return {"error": f"exited with {rc} after {time.monotonic() - t0:.0f} s (see {log_path.name})"}
    return json.loads(out_json.read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random weights of --preset)")
    p.add_argument("--preset", default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=6, help="timed requests, after one warm-up")
    p.add_argument("--max-new-tokens", type=int, default=1000)
    p.add_argument("--seconds-per-char", type=float, default=0.07)
    p.add_argument("--max-s", type=float, default=120.0, help="no new request after this many seconds")
    p.add_argument("--watermark", action="store_true", help="Perth watermark, as upstream (default off)")
    p.add_argument("--out", required=True, help="result JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = bench(a)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
