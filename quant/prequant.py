"""Pre-quantized checkpoints: save a module after `apply_quant` (bnb weights + quant state, in safetensors) and
load it straight into bnb layers without re-quantizing.

File layout: one safetensors file per module. Tensors are the module's state dict, which for bitsandbytes layers
holds the packed weight plus its quant state (`weight.absmax`, `weight.quant_map`, `weight.nested_*`,
`weight.quant_state.bitsandbytes__nf4` for 4-bit; `SCB`, `weight_format` for int8). The metadata records, per
replaced Linear, how it was quantized, so loading needs only the float architecture.

4-bit tensors are always in the layout quantize_4bit produces, never in the packed layout bitsandbytes switches
to on a CPU with AVX512-BF16 (quant/cpu_layout.py): saving undoes that repack exactly first, so the file does not
depend on the CPU that wrote it, and quantize -> forward -> save -> load -> forward gives the same outputs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from quant.apply import check_spec_device, make_quantized_linear, silence_bnb_cast_warning
from quant.cpu_layout import canonicalize, prepare_cpu_layout
from quant.spec import QuantSpec

logger = logging.getLogger(__name__)
FORMAT = "chatterbox-quant/1"


def quantized_layers(module: nn.Module) -> dict[str, QuantSpec]:
    """{name: spec} of the bnb layers in `module`, read back from the layers themselves."""
    import bitsandbytes as bnb
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    rev = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            nested = getattr(m.weight.quant_state, "nested", m.weight.compress_statistics)
            out[name] = QuantSpec(m.weight.quant_type, rev[m.compute_dtype], double_quant=bool(nested))
        elif isinstance(m, bnb.nn.Linear8bitLt):
            dt = rev.get(m.bias.dtype, "fp32") if m.bias is not None else "bf16"
            out[name] = QuantSpec("int8", dt, int8_threshold=float(m.state.threshold))
        elif isinstance(m, DynLinear):
            raise ValueError(f"{name}: dynamic_int8 layers cannot be saved pre-quantized (packed CPU params); "
                             "save the float checkpoint and quantize at load, it takes well under a second")
    return out


def save_quantized(module: nn.Module, path: str | Path) -> dict[str, QuantSpec]:
    """Write `module`'s quantized state dict to `path` (safetensors). Returns the layers recorded."""
    from safetensors.torch import save_file

    canonicalize(module)  # before state_dict(), whose own unpacking of a packed CPU layer is lossy
    layers = quantized_layers(module)
    state = module.state_dict()
    seen: dict[tuple[int, int], str] = {}
    tensors = {}
    for k, v in state.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key in seen:  # safetensors refuses aliased tensors (tied weights): store a copy
            v = v.clone()
        elif key is not None:
            seen[key] = k
        tensors[k] = v.contiguous().cpu()
    meta = {"format": FORMAT, "layers": json.dumps({n: asdict(s) for n, s in layers.items()})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    logger.info("saved %d tensors (%d quantized Linear) to %s", len(tensors), len(layers), path)
    return layers


def read_layers(path: str | Path) -> dict[str, QuantSpec]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pre-quantized checkpoint ({FORMAT}); write it with quant.prequant.save_quantized")
    return {n: QuantSpec(**{**d, "skip": tuple(d.get("skip", ()))}) for n, d in json.loads(meta["layers"]).items()}


def load_quantized(module: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> list[str]:
    """Swap the recorded Linear layers of float `module` for bnb layers filled from `path`, load the rest, and
    move everything to `device`. No quantization runs. Build `module` on the CPU, not on meta (non-persistent buffers
    such as rotary inv_freq are not in the file); `with skip_init(): build()` skips the random init."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    dev = torch.device(device)
    layers = read_layers(path)
    for spec in {s.label(): s for s in layers.values()}.values():
        check_spec_device(spec, dev)
    silence_bnb_cast_warning()
    tensors = load_file(str(path), device=str(dev))
    for name, spec in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{path} quantized {name!r} but the module has {type(lin).__name__} there; "
                             "build the same architecture (preset) the checkpoint was saved from")
        new = make_quantized_linear(lin, spec, dev, quantize=False)
        w = tensors.pop(f"{name}.weight")
        if spec.method == "int8":
            scb = tensors.pop(f"{name}.SCB")
            tensors.pop(f"{name}.weight_format", None)
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False, CB=w, SCB=scb)
        else:
            prefix = f"{name}.weight."
            stats = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
            new.weight = bnb.nn.Params4bit.from_prequantized(w, stats, device=dev, module=new)
            prepare_cpu_layout(new)
        if lin.bias is not None:
            new.bias = nn.Parameter(tensors.pop(f"{name}.bias"), requires_grad=False)
        setattr(parent, child, new)
    result = module.load_state_dict(tensors, strict=False, assign=True)
    bnb_missing = [k for k in result.missing_keys if not any(k.startswith(n + ".") for n in layers)]
    if bnb_missing or result.unexpected_keys:
        raise ValueError(f"{path} does not match the module: missing {bnb_missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}; build the architecture it was saved from")
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{left[:3]} are still on the meta device after loading {path}: non-persistent buffers are not "
                         "in checkpoints; build the module on the CPU (inside quant.prequant.skip_init() it is cheap)")
    module.to(dev)
    logger.info("loaded %d pre-quantized Linear from %s onto %s", len(layers), path, dev)
    return list(layers)


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without running random init (weights are overwritten by a checkpoint anyway)."""
    names = ["uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "orthogonal_"]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


@dataclass(frozen=True)
class LoadTiming:
    device: str
    quantize_at_load_s: float    # build + load float weights + apply_quant (quantizes) + move to device
    prequantized_s: float        # build + load_quantized (no quantization)
    num_layers: int

    @property
    def speedup(self) -> float:
        return self.quantize_at_load_s / max(self.prequantized_s, 1e-9)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_load_paths(build: Callable[[], nn.Module], float_path: str | Path, quant_path: str | Path,
                    spec: QuantSpec, device: str | torch.device = "cpu") -> LoadTiming:
    """Time quantize-at-load against loading a pre-quantized file, for the module `build()` returns.

    float_path: safetensors of the float module (`safetensors.torch.save_file(module.state_dict(), ...)`).
    """
    from safetensors.torch import load_file

    from quant.apply import apply_quant

    dev = torch.device(device)
    _sync(dev)
    t0 = time.perf_counter()
    with skip_init():
        m = build()
    m.load_state_dict(load_file(str(float_path)))
    names = apply_quant(m, spec, device=dev)
    m.to(dev)
    _sync(dev)
    t1 = time.perf_counter()
    del m
    with skip_init():
        m = build()
    load_quantized(m, quant_path, dev)
    _sync(dev)
    t2 = time.perf_counter()
    return LoadTiming(str(dev), t1 - t0, t2 - t1, len(names))
