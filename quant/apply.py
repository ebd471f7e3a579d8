"""apply_quant: the quantization pass. Swaps `nn.Linear` (and subclasses, e.g. diffusers' LoRACompatibleLinear)
for bitsandbytes or torch dynamic-int8 layers and casts the rest to the spec's dtype. Model code never knows.

Where quantization happens: on the device the weights are on (or `device=`). bitsandbytes quantizes when a
parameter is moved with `.to(device)`; since bnb 0.45 this includes `.to("cpu")` (CPU kernels, used by the
tests), so a CPU-built model can be quantized on CPU and then moved to CUDA, or moved first and quantized on CUDA.
On a CPU with AVX512-BF16, 4-bit layers repack themselves on their first forward: see quant/cpu_layout.py.
"""
from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from quant.cpu_layout import describe_cpu_layout, prepare_cpu_layout
from quant.spec import QuantSpec

logger = logging.getLogger(__name__)


class _DropCastWarning(logging.Filter):
    """bnb logs 'inputs will be cast from bf16 to float16' on *every* int8 matmul with bf16 inputs; the cast is
    expected (LLM.int8 quantizes activations from fp16), so keep it out of serving logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def silence_bnb_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in log.filters):
        log.addFilter(_DropCastWarning())


def bnb_unavailable_reason(device: str | torch.device) -> str | None:
    """None when bitsandbytes int8/nf4/fp4 can run on `device`, otherwise why not (with the fix)."""
    dev = torch.device(device)
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # import of a native library can fail in many ways
        return f"bitsandbytes does not import ({e}); install bitsandbytes>=0.45 or choose method 'none' or 'dynamic_int8'"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "device is cuda but torch.cuda.is_available() is False; run on a GPU or set the device to 'cpu'"
    if dev.type not in ("cuda", "cpu", "xpu"):
        return f"bitsandbytes has no kernels for device type {dev.type!r}; choose method 'none' for this device"
    return None


def _bnb_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except Exception:
        return ()
    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def is_quantized_linear(m: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    return isinstance(m, _bnb_types() + (DynLinear,))


def is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A module is skipped when its name or any ancestor's name matches one of the fnmatch patterns."""
    if not skip or not name:
        return False
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in skip)


def find_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the float Linear modules (isinstance, so subclasses count) that a pass would replace.

    A Linear with a single input feature (T3's emotion_adv_fc, 1024 weights) stays float: quantizing it saves
    nothing, and bitsandbytes' int8 CPU kernel on AVX512 machines returns garbage for it (torch._int_mm misreads
    the strides (1, 1) of the transposed [1, N] weight). The estimator counts through this function too."""
    return [
        n for n, m in module.named_modules()
        if n and isinstance(m, nn.Linear) and m.in_features > 1 and not is_quantized_linear(m)
        and not is_skipped(n, skip)
    ]


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def check_spec_device(spec: QuantSpec, device: str | torch.device) -> None:
    dev = torch.device(device)
    if spec.is_bnb and dev.type != "meta":
        reason = bnb_unavailable_reason(dev)
        if reason:
            raise ValueError(f"method {spec.method!r} needs bitsandbytes on {dev}: {reason}")
    if spec.method == "dynamic_int8" and dev.type not in ("cpu", "meta"):
        raise ValueError(f"dynamic_int8 runs on CPU only, not {dev}; use 'int8' (bitsandbytes) on {dev.type}")
    if spec.dtype == "bf16" and dev.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(dev)} has no bf16 support; set dtype 'fp16' or 'fp32'")


def make_quantized_linear(lin: nn.Linear, spec: QuantSpec, device: torch.device, quantize: bool = True) -> nn.Module:
    """One float Linear -> its quantized replacement on `device`. quantize=False builds the empty bnb layer (for
    loading pre-quantized tensors into it)."""
    has_bias = lin.bias is not None
    if spec.method == "dynamic_int8":
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
        from torch.ao.quantization import default_dynamic_qconfig

        plain = nn.Linear(lin.in_features, lin.out_features, bias=has_bias)  # exact type, as from_float wants
        plain.weight, plain.bias = lin.weight, lin.bias
        plain.float().qconfig = default_dynamic_qconfig
        return DynLinear.from_float(plain).train(lin.training)

    import bitsandbytes as bnb

    w = lin.weight.data
    if spec.method == "int8":
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=spec.int8_threshold, device="meta")
        if quantize:
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=spec.torch_dtype,
                                compress_statistics=spec.double_quant, quant_type=spec.method, device="meta")
        if quantize:
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=spec.double_quant,
                                           quant_type=spec.method, module=new)
    if has_bias:
        new.bias = nn.Parameter(lin.bias.data.to(spec.torch_dtype), requires_grad=False)
    new.train(lin.training)  # bnb picks its CPU int8 kernel by training mode; inherit it
    if not quantize:
        return new
    if spec.method == "int8" and w.device.type != "cpu":
        new.weight._quantize(device)  # Int8Params.to() only quantizes when moving off the CPU
        return new.to(device)
    new = new.to(device)  # Params4bit / Int8Params quantize here
    if spec.method != "int8":
        prepare_cpu_layout(new)
    return new


def cast_unquantized(module: nn.Module, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> None:
    """Cast floating parameters and persistent buffers of non-skipped, non-quantized modules to `dtype`.
    Non-persistent buffers (rotary inv_freq, STFT windows, fades) are derived constants and keep their dtype."""
    for name, m in module.named_modules():
        if is_skipped(name, skip) or is_quantized_linear(m):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for bname, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and bname not in m._non_persistent_buffers_set:
                m._buffers[bname] = b.to(dtype)


def replace_linears(module: nn.Module, spec: QuantSpec, device: torch.device, quantize: bool = True) -> list[str]:
    names = find_linears(module, spec.skip)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, make_quantized_linear(getattr(parent, child), spec, device, quantize))
    return names


def apply_quant(module: nn.Module, spec: QuantSpec, *, device: str | torch.device | None = None,
                name: str | None = None) -> list[str]:
    """Quantize `module` in place per `spec`; returns the names of the replaced Linear modules.

    device: where the bnb weights are quantized and placed (default: where the module's weights are now).
    name: component label for the log line ("t3: 210 Linear -> nf4/bf16").
    """
    if isinstance(module, nn.Linear) and not list(module.children()):
        raise ValueError("apply_quant replaces Linear children of a module; pass the parent module, not the Linear")
    dev = torch.device(device) if device is not None else _module_device(module)
    check_spec_device(spec, dev)
    label = name or type(module).__name__
    if spec.method == "none":
        cast_unquantized(module, spec.torch_dtype, spec.skip)
        logger.info("%s: 0 Linear -> %s (no quantization)", label, spec.label())
        return []
    if spec.method == "int8":
        silence_bnb_cast_warning()
    names = replace_linears(module, spec, dev)
    cast_unquantized(module, spec.torch_dtype, spec.skip)
    if not names:
        logger.warning("%s: no nn.Linear found to quantize with %s (conv/LSTM-only module?)", label, spec.label())
    layout = describe_cpu_layout(module) if dev.type == "cpu" else ""
    logger.info("%s: %d Linear -> %s%s", label, len(names), spec.label(),
                f" (4-bit CPU kernels: {layout})" if layout else "")
    return names
