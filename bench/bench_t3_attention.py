"""T3's decode attention alone, the two ways `T3EngineConfig.decode_attention` offers, at the served shapes.

    python -m bench.bench_t3_attention            # CUDA; full-size T3 (16 heads x 64), 1536-position cache

One decode step's attention for one layer (x30 for a step) over a full-size KV cache of `--requests` x 2 rows,
each row at a length drawn from `--lengths` (the served mix: a prompt of 40-340 positions plus up to ~450 speech
tokens). "masked" is what the engine ran before (SDPA over the batch's KV bucket with an additive mask: every row
reads the bucket); "padded_keys" reads each row's own keys. The baseline (masked) runs in the same invocation.
Writes bench_t3_attention.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_t3 import versions  # noqa: E402
from serve_app.engine.t3.config import default_graph_seq_lens  # noqa: E402
from serve_app.engine.t3.graph_runner import pick_bucket  # noqa: E402
from serve_app.engine.t3.llama import (  # noqa: E402
    DECODE_SDPA_BACKENDS, decode_mask, padded_keys_attention, padded_keys_lengths,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", default="8,32,64", help="comma list of requests in the batch (2 rows each)")
    p.add_argument("--lengths", default="40,790", help="min,max row length (uniform)")
    p.add_argument("--max-seq-len", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--checkpoint", default=None, help="unused: random tensors stand in for the cache "
                   "(bench/device_run.sh passes every bench one)")
    return p.parse_args(argv)


def time_ms(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def run_level(n_req: int, args, lo: int, hi: int) -> dict:
    H, D, S, dtype = 16, 64, args.max_seq_len, torch.bfloat16
    rows = 2 * 64  # the served cache: 64 slots
    rng = random.Random(n_req)
    lens = [rng.randint(lo, hi) for _ in range(n_req) for _ in (0, 1)]  # cond and uncond rows
    R = 2 * n_req
    pos = torch.tensor([n - 1 for n in lens], device="cuda")
    kv_len = pick_bucket(default_graph_seq_lens(S), max(lens))
    k_cache = torch.randn(rows, H, S, D, device="cuda", dtype=dtype)
    v_cache = torch.randn(rows, H, S, D, device="cuda", dtype=dtype)
    q = torch.randn(R, H, 1, D, device="cuda", dtype=dtype)
    mask = decode_mask(pos, kv_len, dtype)  # what the engine builds, per step
    seqlen, starts, key_starts = padded_keys_lengths(pos, H * S)

    def masked():
        with sdpa_kernel(DECODE_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k_cache[:R, :, :kv_len], v_cache[:R, :, :kv_len], attn_mask=mask)

    def padded():
        return padded_keys_attention(q, k_cache, v_cache, seqlen, starts, key_starts, S)

    err = (masked().transpose(1, 2).reshape(R, 1, -1).float() - padded().float()).abs().max().item()
    m, p = time_ms(masked, args.repeats), time_ms(padded, args.repeats)
    return {"requests": n_req, "rows": R, "kv_bucket": kv_len, "mean_len": sum(lens) / R,
            "kv_read_ratio_masked": R * kv_len / sum(lens), "masked_us": 1000 * m, "padded_keys_us": 1000 * p,
            "speedup": m / p, "max_abs_diff": err}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    lo, hi = (int(x) for x in args.lengths.split(","))
    report = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "config": vars(args),
              "versions": versions(),
              "levels": [run_level(int(n), args, lo, hi) for n in args.requests.split(",")]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_t3_attention.json").write_text(json.dumps(report, indent=2))
    lines = [f"# T3 decode attention, one layer ({report['device']}, {report['timestamp']})", "",
             f"config: {json.dumps(report['config'])}; versions: {report['versions']}", "",
             "| requests (rows) | KV bucket | mean row length | masked reads / needed | masked us | padded_keys us "
             "| speedup | max abs diff |", "|---|---|---|---|---|---|---|---|"]
    for lv in report["levels"]:
        lines.append(f"| {lv['requests']} ({lv['rows']}) | {lv['kv_bucket']} | {lv['mean_len']:.0f} | "
                     f"{lv['kv_read_ratio_masked']:.2f} | {lv['masked_us']:.1f} | {lv['padded_keys_us']:.1f} | "
                     f"{lv['speedup']:.2f}x | {lv['max_abs_diff']:.1e} |")
    (out / "bench_t3_attention.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
