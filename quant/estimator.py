"""Memory estimator: predicts a replica's GPU memory from its components, their QuantSpecs and its load.

    total = weights (per component, per method) + T3 KV cache (static, N requests x length)
            + activations (rough model below, at a batch size) + CUDA context

Parameter counts come from the real architecture: the upstream modules are built on the meta device through
`serve_app.model.presets` (no memory, ~3 s, cached). Bytes per quantized Linear:
  none/fp:  numel x dtype bytes
  int8:     numel x 1 + out_features x 4 (fp32 row scales, SCB)                     (bitsandbytes LLM.int8)
  nf4/fp4:  numel / 2 + absmax: one per 64-value block, fp32 (4 B) or, with double quant, uint8 (1 B)
            + one fp32 per 256 blocks + a 256-entry fp32 code book per layer
            (GPU layout. On a CPU with AVX512-BF16 a 4-bit layer whose shape packs holds, after its first forward,
            its absmax as bf16, 2 B per block, next to the statistics above, kept to save it exactly:
            quant/cpu_layout.py. The estimator sizes GPU replicas and does not model that.)
A Linear with one input feature stays float (quant.apply.find_linears) and is counted as such.
Reference points measured on an H100 (`torch.cuda.memory_allocated` deltas) that the tests hold us to (10 %):
T3 backbone bf16 960 MiB, int8 482 MiB, nf4 248 MiB; fp32 T3 2031 MiB, fp32 S3Gen 1024 MiB; upstream
single-request peak 3476 MiB.

Activation model (rough, documented, calibrated to that single-request peak; expect +-25 % per stage):
  T3 prefill workspace   = 2B rows x L x (2 hidden + 2 intermediate) x dtype bytes      (residual + MLP up/gate)
                           + for 4-bit: one dequantized weight of the largest Linear
  S3Gen per request      = T = 2 x (prompt + speech tokens) mel frames:
      encoder (fp32 rel-pos attention scores, 3 live)  3 x 8 heads x T^2 x 4 B
      CFM estimator (CFG doubles the batch)            2 x 30 x 256 ch x T x dtype bytes
      HiFT on the generated part (S = 480 x T_gen samples) (3 x 64 ch x S/4 + 20 x S) x 4 B
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from quant.apply import is_skipped
from quant.components import COMPONENTS, S3GEN_KEYS, T3_KEYS
from quant.spec import DTYPES, QuantSpec

MiB = 1 << 20
GiB = 1 << 30
CUDA_CONTEXT_PROCESS_BYTES = int(0.6 * GiB)   # CUDA context + cuBLAS workspace of a plain process
CUDA_CONTEXT_RAY_BYTES = int(0.75 * GiB)      # the same inside a Ray Serve replica (extra libraries, NCCL stubs)
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

# Default request shape (about 10 s of speech, a 10 s voice prompt): the upstream reference measurement.
DEFAULT_SEQ_LEN = 350            # T3 tokens per request: conditioning 34 + text ~60 + speech ~250
DEFAULT_SPEECH_TOKENS = 250      # generated speech tokens per request (25 tokens/s)
DEFAULT_PROMPT_TOKENS = 250      # S3Gen reference prompt tokens (10 s)


def dtype_bytes(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class ComponentInventory:
    key: str
    num_params: int                                   # all parameters of the component
    linears: tuple[tuple[str, int, int, bool], ...]   # (name, out, in, has_bias) of float Linear modules
    buffer_bytes: int                                 # buffers at their native dtype

    @property
    def num_linear_params(self) -> int:
        return sum(o * i + (o if b else 0) for _, o, i, b in self.linears)


@dataclass(frozen=True)
class ModelInventory:
    preset: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    components: dict[str, ComponentInventory]


@functools.lru_cache(maxsize=4)
def model_inventory(preset: str = "full") -> ModelInventory:
    """Count parameters per component on the real architecture, built on the meta device."""
    from serve_app.model.presets import build_s3gen, build_t3, build_voice_encoder, get_preset
    from quant.components import component_module, count_params, linear_shapes  # noqa: F401
    from quant.apply import find_linears

    p = get_preset(preset)
    with torch.device("meta"):
        roots = {"t3": build_t3(p), "s3gen": build_s3gen(p), "voice_encoder": build_voice_encoder()}
    comps = {}
    for key, comp in COMPONENTS.items():
        module = component_module(comp, roots)
        total, _ = count_params(module, comp.skip)
        lins = []
        for name in find_linears(module, comp.skip):
            lin = module.get_submodule(name)
            lins.append((name, lin.out_features, lin.in_features, lin.bias is not None))
        bufs = sum(b.numel() * b.element_size() for n, b in module.named_buffers()
                   if not is_skipped(n.rpartition(".")[0], comp.skip))
        comps[key] = ComponentInventory(key, total, tuple(lins), bufs)
    return ModelInventory(preset, p.t3.num_layers, p.t3.hidden_size, p.t3.intermediate_size, comps)


def quantized_linear_bytes(out_f: int, in_f: int, has_bias: bool, spec: QuantSpec) -> int:
    numel = out_f * in_f
    bias = out_f * dtype_bytes(spec.dtype) if has_bias else 0
    if spec.method == "none":
        return (numel + (out_f if has_bias else 0)) * dtype_bytes(spec.dtype)
    if spec.method in ("int8", "dynamic_int8"):
        return numel + out_f * 4 + (out_f * 4 if spec.method == "dynamic_int8" and has_bias else bias)
    # nf4 / fp4
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    if spec.double_quant:
        stats = blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 256 * 4 + 16 * 4
    else:
        stats = blocks * 4 + 16 * 4
    return math.ceil(numel / 2) + stats + bias


def component_weight_bytes(inv: ComponentInventory, spec: QuantSpec) -> int:
    linear_params = 0
    linear_bytes = 0
    for name, o, i, b in inv.linears:
        n = o * i + (o if b else 0)
        linear_params += n
        s = spec if not is_skipped(name, spec.skip) else QuantSpec("none", spec.dtype)
        linear_bytes += quantized_linear_bytes(o, i, b, s)
    other_params = inv.num_params - linear_params
    return other_params * dtype_bytes(spec.dtype) + linear_bytes + inv.buffer_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    weights: dict[str, int]                      # bytes per component
    kv_cache_bytes: int
    activation_bytes: int
    cuda_context_bytes: int
    config: dict = field(default_factory=dict)   # the inputs, for reports

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def allocated_bytes(self) -> int:
        """What torch's allocator holds at peak (comparable to torch.cuda.max_memory_allocated)."""
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        """What nvidia-smi would show for the process (plus allocator fragmentation, not modelled)."""
        return self.allocated_bytes + self.cuda_context_bytes

    def rows(self) -> list[tuple[str, float]]:
        out = [(f"weights[{k}]", v / MiB) for k, v in self.weights.items()]
        out += [("kv_cache", self.kv_cache_bytes / MiB), ("activations", self.activation_bytes / MiB),
                ("cuda_context", self.cuda_context_bytes / MiB), ("total", self.total_bytes / MiB)]
        return out


def kv_cache_bytes(inv: ModelInventory, num_requests: int, seq_len: int, dtype: str) -> int:
    """Static T3 KV cache: layers x (k, v) x 2 rows per request (classifier-free guidance) x length x hidden."""
    return inv.num_layers * 2 * 2 * num_requests * seq_len * inv.hidden_size * dtype_bytes(dtype)


def t3_activation_bytes(inv: ModelInventory, batch_size: int, seq_len: int, spec: QuantSpec) -> int:
    rows = 2 * batch_size
    work = rows * seq_len * (2 * inv.hidden_size + 2 * inv.intermediate_size) * dtype_bytes(spec.dtype)
    if spec.method in ("nf4", "fp4"):
        work += inv.intermediate_size * inv.hidden_size * dtype_bytes(spec.dtype)
    return work


def s3gen_activation_bytes(batch_size: int, speech_tokens: int, prompt_tokens: int, keys: set[str],
                           decoder_dtype: str) -> int:
    t = 2 * (prompt_tokens + speech_tokens)  # mel frames, prompt included
    total = 0
    if "s3gen_flow_encoder" in keys:
        total += 3 * 8 * t * t * 4
    if "s3gen_flow_decoder" in keys:
        total += 2 * 30 * 256 * t * dtype_bytes(decoder_dtype)
    if "hift" in keys:
        s = 480 * 2 * speech_tokens
        total += (3 * 64 * s // 4 + 20 * s) * 4
    return batch_size * total


def estimate_replica(specs: dict[str, QuantSpec], *, preset: str = "full", num_requests: int = 1,
                     seq_len: int = DEFAULT_SEQ_LEN, batch_size: int | None = None,
                     speech_tokens: int = DEFAULT_SPEECH_TOKENS, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                     ray_replica: bool = True, kv_dtype: str | None = None) -> MemoryEstimate:
    """Predict one replica's GPU memory. `specs` names the components it holds (others are not counted).

    num_requests x seq_len sizes the static T3 KV cache; batch_size (default num_requests) sizes activations.
    kv_dtype defaults to the T3 backbone's dtype.
    """
    unknown = set(specs) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; known: {list(COMPONENTS)}")
    if num_requests < 0 or seq_len <= 0:
        raise ValueError(f"num_requests={num_requests} and seq_len={seq_len} must be >= 0 and > 0")
    inv = model_inventory(preset)
    bs = num_requests if batch_size is None else batch_size
    weights = {k: component_weight_bytes(inv.components[k], s) for k, s in specs.items()}
    kv = act = 0
    if "t3" in specs:
        kv = kv_cache_bytes(inv, num_requests, seq_len, kv_dtype or specs["t3"].dtype)
        act += t3_activation_bytes(inv, bs, seq_len, specs["t3"])
    s3_keys = set(specs) & set(S3GEN_KEYS)
    if s3_keys:
        dec = specs.get("s3gen_flow_decoder", QuantSpec("none", "fp32")).dtype
        act += s3gen_activation_bytes(bs, speech_tokens, prompt_tokens, s3_keys, dec)
    ctx = CUDA_CONTEXT_RAY_BYTES if ray_replica else CUDA_CONTEXT_PROCESS_BYTES
    config = dict(preset=preset, num_requests=num_requests, seq_len=seq_len, batch_size=bs,
                  speech_tokens=speech_tokens, prompt_tokens=prompt_tokens, ray_replica=ray_replica,
                  specs={k: s.label() for k, s in specs.items()})
    return MemoryEstimate(weights, kv, act, ctx, config)


def upstream_specs() -> dict[str, QuantSpec]:
    """The upstream ChatterboxTTS: every component in fp32, nothing quantized."""
    return {k: QuantSpec("none", "fp32") for k in COMPONENTS}


__all__ = ["MemoryEstimate", "estimate_replica", "model_inventory", "upstream_specs", "MiB", "GiB",
           "T3_KEYS", "S3GEN_KEYS"]
