"""Named quantization strategies -> one QuantSpec per component, plus the CHATTERBOX_QUANTIZATION parser.

    none          nothing quantized (T3 in bf16 on CUDA, fp32 on CPU; S3Gen, vocoder, encoders in fp32)
    conservative  bnb int8 T3 backbone, int8 S3Gen flow (encoder + CFM estimator)
    mixed         bnb nf4 T3 backbone, int8 S3Gen flow
    aggressive    nf4 wherever Linear quantization applies (T3 backbone and extras, flow, S3 tokenizer)
    dynamic       torch dynamic int8 (CPU only) for the T3 backbone and the flow
    auto          the least aggressive of none/conservative/mixed/aggressive whose estimated replica fits a VRAM
                  budget (estimator.py); on CPU, none

int8 specs use threshold 0.0 (no outlier decomposition): it is what CUDA graphs can capture, and is faster.
Environment: CHATTERBOX_QUANTIZATION="mixed", "mixed,t3=int8", "auto,vram=20GiB", "none,flow=int8@6:bf16"
(override values are `method[@int8_threshold][:dtype]`; `flow` means both flow components).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from quant.apply import check_spec_device
from quant.components import COMPONENT_KEYS, COMPONENTS
from quant.spec import QuantSpec, parse_spec

ENV_VAR = "CHATTERBOX_QUANTIZATION"
STRATEGIES: tuple[str, ...] = ("none", "conservative", "mixed", "aggressive", "dynamic", "auto")
AUTO_ORDER: tuple[str, ...] = ("none", "conservative", "mixed", "aggressive")   # best fidelity first
ALIASES: dict[str, tuple[str, ...]] = {"flow": ("s3gen_flow_encoder", "s3gen_flow_decoder")}
FLOW = ALIASES["flow"]

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def base_specs(device: str | torch.device) -> dict[str, QuantSpec]:
    """The `none` strategy on `device`: T3 in bf16 on CUDA (fp32 on CPU), the rest in fp32 as upstream."""
    t3_dtype = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return {k: QuantSpec("none", t3_dtype if k in ("t3", "t3_extra") else "fp32", int8_threshold=0.0)
            for k in COMPONENT_KEYS}


def _with(spec: QuantSpec, method: str) -> QuantSpec:
    dtype = "fp32" if method == "dynamic_int8" else spec.dtype
    return QuantSpec(method, dtype, 0.0, spec.double_quant, spec.skip)


def named_strategy(name: str, device: str | torch.device) -> dict[str, QuantSpec]:
    specs = base_specs(device)
    plan: dict[str, str] = {
        "none": {},
        "conservative": {"t3": "int8", **{k: "int8" for k in FLOW}},
        "mixed": {"t3": "nf4", **{k: "int8" for k in FLOW}},
        "aggressive": {k: "nf4" for k, c in COMPONENTS.items() if c.bnb_applies},
        "dynamic": {"t3": "dynamic_int8", **{k: "dynamic_int8" for k in FLOW}},
    }.get(name)
    if plan is None:
        raise ValueError(f"unknown quantization strategy {name!r}; choose one of {list(STRATEGIES)}")
    return {k: _with(s, plan[k]) if k in plan else s for k, s in specs.items()}


def validate_specs(specs: Mapping[str, QuantSpec], device: str | torch.device) -> None:
    for key, spec in specs.items():
        comp = COMPONENTS.get(key)
        if comp is None:
            raise ValueError(f"unknown component {key!r}; known: {list(COMPONENT_KEYS)} (or alias 'flow')")
        if spec.method != "none" and not comp.bnb_applies:
            raise ValueError(f"{key}: {comp.note}; set {key}=none")
        try:
            check_spec_device(spec, device)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None


def resolve_strategy(name: str, *, device: str, vram_budget_bytes: int | None = None,
                     overrides: dict[str, QuantSpec] | None = None, components: Iterable[str] | None = None,
                     num_requests: int = 1, seq_len: int | None = None) -> dict[str, QuantSpec]:
    """Strategy name (+ per-component overrides) -> {component: QuantSpec} for all components.
    `name` may also be a full CHATTERBOX_QUANTIZATION value ("mixed,t3=int8"); explicit `overrides` win.

    `auto` estimates the replica holding `components` (default all) with `num_requests` x `seq_len` KV cache
    and picks the first of none/conservative/mixed/aggressive whose total fits `vram_budget_bytes` (default: the
    free memory of the CUDA device).
    """
    if "," in name or "=" in name:  # the CHATTERBOX_QUANTIZATION syntax, e.g. "mixed,t3=int8"
        name, parsed, budget = parse_quantization(name, device)
        overrides = {**parsed, **(overrides or {})}
        vram_budget_bytes = vram_budget_bytes if vram_budget_bytes is not None else budget
    overrides = expand_aliases(overrides or {})
    if name == "auto":
        specs = _auto(device, vram_budget_bytes, overrides, components, num_requests, seq_len)
    else:
        specs = named_strategy(name, device)
    specs.update(overrides)
    validate_specs(specs, device)
    return specs


def _auto(device, budget, overrides, components, num_requests, seq_len) -> dict[str, QuantSpec]:
    if torch.device(device).type != "cuda":
        return named_strategy("none", device)
    if budget is None:
        if not torch.cuda.is_available():
            raise ValueError("auto quantization needs a VRAM budget: pass vram_budget_bytes (or 'auto,vram=20GiB')")
        budget = torch.cuda.mem_get_info(torch.device(device))[0]
    return named_strategy(auto_strategy_name(device, budget, overrides, components, num_requests, seq_len), device)


def auto_strategy_name(device: str, budget: int, overrides: dict[str, QuantSpec] | None = None,
                       components: Iterable[str] | None = None, num_requests: int = 1,
                       seq_len: int | None = None) -> str:
    """The first of AUTO_ORDER whose estimated replica (with overrides) fits `budget` bytes."""
    from quant.estimator import DEFAULT_SEQ_LEN, MiB, estimate_replica

    keys = list(components) if components is not None else list(COMPONENT_KEYS)
    tried = []
    for cand in AUTO_ORDER:
        specs = {**named_strategy(cand, device), **(overrides or {})}
        est = estimate_replica({k: specs[k] for k in keys}, num_requests=num_requests,
                               seq_len=seq_len or DEFAULT_SEQ_LEN)
        tried.append(f"{cand}={est.total_bytes / MiB:.0f} MiB")
        if est.total_bytes <= budget:
            return cand
    raise ValueError(
        f"no quantization strategy fits a VRAM budget of {budget / MiB:.0f} MiB for {num_requests} request(s) "
        f"({', '.join(tried)}); lower the concurrency or sequence length, split T3 and S3Gen into separate replicas, "
        f"or give the replica more GPU memory"
    )


def expand_aliases(overrides: Mapping[str, QuantSpec]) -> dict[str, QuantSpec]:
    out: dict[str, QuantSpec] = {}
    for key, spec in overrides.items():
        for k in ALIASES.get(key, (key,)):
            out[k] = spec
    return out


def parse_bytes(text: str) -> int:
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"bad memory size {text!r}; write e.g. '20GiB', '512MiB' or a number of bytes")
    return int(float(num) * _UNITS[unit])


def parse_quantization(value: str, device: str) -> tuple[str, dict[str, QuantSpec], int | None]:
    """'mixed,t3=int8,vram=20GiB' -> ('mixed', {'t3': QuantSpec(int8, ...)}, 20 GiB). Override specs start from the
    named strategy's spec for that component, so 't3=int8' keeps T3's dtype."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"empty {ENV_VAR}; set e.g. {ENV_VAR}=mixed or {ENV_VAR}=mixed,t3=int8")
    name, rest = (parts[0], parts[1:]) if "=" not in parts[0] else ("none", parts)
    if name not in STRATEGIES:
        raise ValueError(f"unknown quantization strategy {name!r} in {value!r}; choose one of {list(STRATEGIES)}")
    base = named_strategy("none" if name == "auto" else name, device)
    overrides: dict[str, QuantSpec] = {}
    budget = None
    for item in rest:
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not val:
            raise ValueError(f"bad item {item!r} in {value!r}; write component=method, e.g. t3=int8")
        if key == "vram":
            budget = parse_bytes(val)
            continue
        keys = ALIASES.get(key, (key,))
        for k in keys:
            if k not in COMPONENTS:
                raise ValueError(f"unknown component {key!r} in {value!r}; known: {list(COMPONENT_KEYS)} or 'flow'")
            overrides[k] = parse_spec(val, base[k])
    return name, overrides, budget


def resolve_quantization(value: str, device: str, **kwargs) -> dict[str, QuantSpec]:
    """Resolve a CHATTERBOX_QUANTIZATION value ("mixed,t3=int8,vram=20GiB") for `device`. This package reads no
    environment: the serving app declares the variable once (`serve_app.envs`) and passes its value."""
    name, overrides, budget = parse_quantization(value, device)
    if budget is not None:
        kwargs["vram_budget_bytes"] = budget
    return resolve_strategy(name, device=device, overrides=overrides, **kwargs)
