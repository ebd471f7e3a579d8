"""Benchmark quantization: measured VRAM per component and strategy next to the estimator, a loaded replica's
peak, and pre-quantized load time against quantize-at-load. Upstream (fp32 modules) is measured in the same run.

    .venv/bin/python -m bench.bench_quant                       # GPU: full preset (random weights), cuda
    .venv/bin/python -m bench.bench_quant --checkpoint DIR      # GPU: weights from a checkpoint folder
    .venv/bin/python -m bench.bench_quant --smoke               # CPU: tiny preset, small sizes (checks the script)

Weights alone: `torch.cuda.memory_allocated` delta after quantizing a copy of each component straight onto the
GPU and moving the rest of it there (on CPU, --smoke: the bytes of its state dict and buffers). Replica peak:
`torch.cuda.max_memory_allocated` over one upstream request (T3.inference with CFG, stop token disabled so the
length is fixed, then S3Gen.inference) with every component loaded and quantized per the strategy.
Results: bench_quant.json + bench_quant.md (bench_quant_smoke.* with --smoke) under --out.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.cli import markdown_table  # noqa: E402
from quant.components import COMPONENTS, component_module, quantize_model  # noqa: E402
from quant.estimator import (MiB, component_weight_bytes, estimate_replica, model_inventory,  # noqa: E402
                             upstream_specs)
from quant.spec import QuantSpec  # noqa: E402
from quant.strategies import named_strategy  # noqa: E402

logger = logging.getLogger("bench_quant")
REFERENCE_MIB = {"t3_backbone_bf16": 960, "t3_backbone_int8": 482, "t3_backbone_nf4": 248, "t3_fp32": 2031,
                 "s3gen_fp32": 1024, "upstream_peak": 3476}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny preset on CPU, small sizes")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random weights of --preset)")
    p.add_argument("--preset", default=None, help="default: full, or tiny with --smoke")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--strategies", default="none,conservative,mixed,aggressive", help="comma list")
    p.add_argument("--tokens", type=int, default=None, help="speech tokens of the replica-peak request (250; smoke 6)")
    p.add_argument("--text-tokens", type=int, default=60, help="text tokens of the replica-peak request")
    p.add_argument("--ref-seconds", type=float, default=None, help="voice reference length (10 s as upstream's "
                   "S3Gen prompt; smoke 2 s)")
    p.add_argument("--no-peak", action="store_true", help="skip the replica-peak runs")
    p.add_argument("--no-load-timing", action="store_true", help="skip the load-time comparison")
    p.add_argument("--out", default="bench/results", help="output directory")
    a = p.parse_args(argv)
    a.preset = a.preset or ("tiny" if a.smoke else "full")
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    a.tokens = a.tokens or (6 if a.smoke else 250)
    a.ref_seconds = a.ref_seconds or (2.0 if a.smoke else 10.0)
    if a.smoke:
        a.text_tokens = min(a.text_tokens, 12)
    a.strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    return a


# ---- measurement ------------------------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def module_bytes(m: nn.Module) -> int:
    """CPU stand-in for allocated memory: state dict (incl. bnb quant state) + non-persistent buffers."""
    seen, total = set(), 0
    tensors = list(m.state_dict().values()) + [b for _, b in m.named_buffers()]
    for t in tensors:
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def copy_component(roots: dict, key: str) -> nn.Module:
    """Deep copy of one component's module without its skipped children (owned by other components)."""
    comp = COMPONENTS[key]
    module = component_module(comp, roots)
    held = {name: getattr(module, name) for name in comp.skip}
    try:
        for name in held:
            setattr(module, name, nn.Module())
        return copy.deepcopy(module)
    finally:
        for name, child in held.items():
            setattr(module, name, child)


def measure_component(roots: dict, key: str, spec: QuantSpec, dev: torch.device) -> dict:
    from quant.apply import apply_quant

    _free(dev)
    m = copy_component(roots, key)
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    t0 = time.perf_counter()
    names = apply_quant(m, spec, device=dev, name=key)
    m.to(dev)
    _sync(dev)
    secs = time.perf_counter() - t0
    got = torch.cuda.memory_allocated(dev) - before if dev.type == "cuda" else module_bytes(m)
    del m
    _free(dev)
    return {"measured_mib": got / MiB, "replaced": len(names), "quantize_s": secs}


# ---- models -----------------------------------------------------------------------------------------------------
def load_float_models(args) -> dict:
    if args.checkpoint:
        from serve_app.model.loader import load_s3gen, load_t3, load_voice_encoder, resolve_checkpoint

        info = resolve_checkpoint(args.checkpoint)
        return {"t3": load_t3(info), "s3gen": load_s3gen(info), "voice_encoder": load_voice_encoder(info)}
    from serve_app.model.presets import build_s3gen, build_t3, build_voice_encoder, get_preset

    torch.manual_seed(0)
    p = get_preset(args.preset)
    return {"t3": build_t3(p).eval(), "s3gen": build_s3gen(p).eval(), "voice_encoder": build_voice_encoder().eval()}


@torch.inference_mode()
def upstream_request(roots: dict, dev: torch.device, text_tokens: int, speech_tokens: int, t3_dtype,
                     ref_seconds: float) -> dict:
    """One request through upstream T3.inference (CFG, fixed length) then S3Gen.inference; returns lengths."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from serve_app.model.checkpoint import synthetic_reference

    t3, s3gen = roots["t3"], roots["s3gen"]
    g = torch.Generator().manual_seed(0)
    ref = torch.from_numpy(synthetic_reference(ref_seconds)).to(dev)
    ref_dict = s3gen.embed_ref(ref, 24000, device=dev)
    cond = T3Cond(speaker_emb=torch.randn(1, 256, generator=g), cond_prompt_speech_tokens=ref_dict["prompt_token"][:, :150],
                  emotion_adv=0.5 * torch.ones(1, 1, 1)).to(device=dev)
    cond.speaker_emb, cond.emotion_adv = cond.speaker_emb.to(t3_dtype), cond.emotion_adv.to(t3_dtype)
    hp = t3.hp
    text = torch.randint(1, hp.text_tokens_dict_size - 2, (1, text_tokens), generator=g)
    text = torch.cat([torch.full((1, 1), hp.start_text_token), text, torch.full((1, 1), hp.stop_text_token)], 1)
    text = text.repeat(2, 1).to(dev)  # two rows for classifier-free guidance
    stop, hp.stop_speech_token = hp.stop_speech_token, -1  # random weights: fix the length instead
    try:
        tokens = t3.inference(t3_cond=cond, text_tokens=text, max_new_tokens=speech_tokens, cfg_weight=0.5)
    finally:
        hp.stop_speech_token = stop
    tokens = (tokens[0] % 6561).unsqueeze(0)  # S3Gen vocabulary; upstream drops special tokens
    wav, _ = s3gen.inference(speech_tokens=tokens, ref_dict=ref_dict)
    prompt = int(ref_dict["prompt_token"].shape[1])
    # T3 positions: speaker 1 + perceiver 32 + emotion 1, text, BOS + generated speech
    return {"seq_len": 34 + text.shape[1] + 1 + tokens.shape[1],
            "speech_tokens": int(tokens.shape[1]), "prompt_tokens": prompt, "samples": int(wav.shape[-1])}


def replica_peak(floats: dict, specs: dict[str, QuantSpec], dev: torch.device, args) -> dict:
    _free(dev)
    roots = {k: copy.deepcopy(v) for k, v in floats.items()}
    quantize_model(specs, device=dev, **roots)
    for m in roots.values():
        m.to(dev).eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        loaded = torch.cuda.memory_allocated(dev)
    else:
        loaded = sum(module_bytes(m) for m in roots.values())
    t0 = time.perf_counter()
    shape = upstream_request(roots, dev, args.text_tokens, args.tokens, roots["t3"].speech_head.weight.dtype,
                             args.ref_seconds)
    _sync(dev)
    out = {"loaded_mib": loaded / MiB, "request_s": time.perf_counter() - t0, **shape}
    out["peak_mib"] = torch.cuda.max_memory_allocated(dev) / MiB if dev.type == "cuda" else None
    est = estimate_replica(specs, preset=args.preset, num_requests=1, seq_len=shape["seq_len"],
                           speech_tokens=shape["speech_tokens"], prompt_tokens=shape["prompt_tokens"])
    out["estimated_peak_mib"] = est.allocated_bytes / MiB
    del roots
    _free(dev)
    return out


def load_timing(floats: dict, dev: torch.device, args) -> list[dict]:
    """T3 backbone: quantize at load vs load pre-quantized, per bnb method."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from quant.prequant import save_quantized, time_load_paths

    t3 = floats["t3"]
    cfg = LLAMA_CONFIGS[t3.hp.llama_config_name]
    build = lambda: LlamaModel(LlamaConfig(**cfg)).eval()  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fpath = Path(tmp) / "float.safetensors"
        save_file({k: v.contiguous() for k, v in t3.tfmr.state_dict().items()}, str(fpath))
        for spec in (QuantSpec("int8", "bf16", int8_threshold=0.0), QuantSpec("nf4", "bf16")):
            m = copy.deepcopy(t3.tfmr)
            from quant.apply import apply_quant

            apply_quant(m, spec, device=dev)
            qpath = Path(tmp) / f"{spec.method}.safetensors"
            save_quantized(m.to(dev), qpath)
            del m
            _free(dev)
            timing = time_load_paths(build, fpath, qpath, spec, dev)
            rows.append({"spec": spec.label(), "quantize_at_load_s": timing.quantize_at_load_s,
                         "prequantized_s": timing.prequantized_s, "speedup": timing.speedup,
                         "file_mib": qpath.stat().st_size / MiB, "float_file_mib": fpath.stat().st_size / MiB})
            _free(dev)
    return rows


# ---- main -------------------------------------------------------------------------------------------------------
def environment(args, dev: torch.device) -> dict:
    def ver(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpu = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu,
            "torch": torch.__version__, "bitsandbytes": ver("bitsandbytes"), "chatterbox-tts": ver("chatterbox-tts"),
            "transformers": ver("transformers"), "python": platform.python_version(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {k: v for k, v in vars(args).items()}}


def guarded(results: dict, key: str, fn, *a):
    try:
        results[key] = fn(*a)
    except Exception as e:  # keep the rest of the run; the error is part of the result
        logger.error("%s failed: %s", key, e)
        results[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    return results[key]


def run(args) -> dict:
    dev = torch.device(args.device)
    floats = load_float_models(args)
    inv = model_inventory(args.preset)
    res: dict = {"env": environment(args, dev), "components": [], "replica": {}, "load_timing": None,
                 "reference_mib": REFERENCE_MIB if args.preset == "full" else None}
    plans = {"upstream": upstream_specs(), **{n: named_strategy(n, args.device) for n in args.strategies}}
    done: dict[tuple[str, str], dict] = {}
    for name, specs in plans.items():
        for key, spec in specs.items():
            if (key, spec.label()) not in done:
                m = guarded({}, key, measure_component, floats, key, spec, dev)
                done[(key, spec.label())] = m
            pred = component_weight_bytes(inv.components[key], spec) / MiB
            res["components"].append({"strategy": name, "component": key, "spec": spec.label(),
                                      "predicted_mib": pred, **done[(key, spec.label())]})
            logger.info("%s %s %s: %s (predicted %.1f MiB)", name, key, spec.label(), done[(key, spec.label())], pred)
    if not args.no_peak:
        for name, specs in plans.items():
            guarded(res["replica"], name, replica_peak, floats, specs, dev, args)
            logger.info("replica %s: %s", name, res["replica"][name])
    if not args.no_load_timing:
        res["load_timing"] = guarded({}, "t3", load_timing, floats, dev, args)
    return res


def to_markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"# bench_quant on {env['device']}", "",
             f"torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, chatterbox-tts {env['chatterbox-tts']}, "
             f"transformers {env['transformers']}; {env['time']}; preset {env['config']['preset']}", "",
             "## Weights per component (MiB)", ""]
    rows = [[r["strategy"], r["component"], r["spec"], r.get("replaced", "-"), r.get("measured_mib", r.get("error")),
             r["predicted_mib"]] for r in res["components"]]
    lines += [markdown_table(["strategy", "component", "spec", "Linear replaced", "measured", "predicted"], rows), ""]
    totals = {}
    for r in res["components"]:
        t = totals.setdefault(r["strategy"], [0.0, 0.0])
        t[0] += r.get("measured_mib", 0.0) or 0.0
        t[1] += r["predicted_mib"]
    lines += ["## Replica (all components)", ""]
    rows = []
    for name, (meas, pred) in totals.items():
        rp = res["replica"].get(name, {})
        rows.append([name, meas, pred, rp.get("loaded_mib", "-"), rp.get("peak_mib", rp.get("error", "-")),
                     rp.get("estimated_peak_mib", "-"), rp.get("request_s", "-")])
    lines += [markdown_table(["strategy", "weights measured", "weights predicted", "loaded", "peak (1 request)",
                              "estimated peak", "request s"], rows), ""]
    if res.get("reference_mib"):
        lines += ["Reference (H100): " + ", ".join(f"{k} {v} MiB" for k, v in res["reference_mib"].items()), ""]
    lt = res.get("load_timing")
    if isinstance(lt, list):
        lines += ["## T3 backbone load time", "",
                  markdown_table(["spec", "quantize at load s", "pre-quantized s", "speedup", "file MiB"],
                                 [[r["spec"], r["quantize_at_load_s"], r["prequantized_s"], r["speedup"],
                                   r["file_mib"]] for r in lt]), ""]
    elif lt:
        lines += [f"load timing failed: {lt.get('error')}", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_quant_smoke" if args.smoke else "bench_quant"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    md = to_markdown(res)
    (out / f"{stem}.md").write_text(md)
    logger.info("wrote %s and %s", out / f"{stem}.json", out / f"{stem}.md")
    sys.stdout.write(md + "\n")


if __name__ == "__main__":
    main()
