"""Engine configuration: a frozen dataclass validated once, with errors that name the fix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .llama import DECODE_ATTENTION_KERNELS

DTYPES = ("fp32", "fp16", "bf16")
DECODE_ATTENTION = ("auto", *DECODE_ATTENTION_KERNELS)

# Upstream T3 vocabulary (chatterbox T3Config): speech tokens 0..6560 are audio codes.
START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
NUM_AUDIO_TOKENS = 6561  # tokens >= this are never returned to callers
START_TEXT_TOKEN = 255
STOP_TEXT_TOKEN = 0


def default_graph_batch_sizes(max_batch_requests: int) -> tuple[int, ...]:
    """nano-vllm's buckets: 1, 2, 4, 8, then every 16, always ending at max_batch_requests."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_requests]
    sizes += list(range(16, max_batch_requests, 16))
    sizes.append(max_batch_requests)
    return tuple(sorted(set(sizes)))


def default_graph_seq_lens(max_seq_len: int) -> tuple[int, ...]:
    """KV-length buckets: 256, then every 128 to 1024, then every 256, capped at max_seq_len. A decode step attends
    over the bucket of the batch's longest request, and SDPA with a mask reads every position of it for every row
    (KV: 122,880 bytes per row and position, two rows a request): with 36 requests at the 1024 bucket a step reads
    9.1 GB of KV, at 640 5.7 GB. Powers of two (256, 512, 1024) put a batch whose longest request has 520
    positions at 1024; these buckets put it at 640, for 72 decode graphs instead of 32 at 1536 positions and 64
    requests (captured in ~60 ms each)."""
    lens = [256] + list(range(384, 1025, 128)) + list(range(1280, max_seq_len, 256))
    return tuple(n for n in lens if n < max_seq_len) + (max_seq_len,)


def default_prefill_lens(max_seq_len: int, largest: int = 384, step: int = 32) -> tuple[int, ...]:
    """Prompt-length buckets of a one-request prefill: 64, 96, ... `largest` (every `step`), within max_seq_len.
    A T3 prompt is 38 positions plus its text tokens; a 300-character text chunk stays under 384."""
    return tuple(n for n in range(64, largest + 1, step) if n <= max_seq_len)


@dataclass(frozen=True)
class T3EngineConfig:
    """Static sizes of the engine. Requests are counted in requests; each uses two cache rows (cond, uncond)."""

    max_batch_requests: int = 64
    # cond (34) + text (<= ~300 incl. SOT/EOT) + 2 BOS + 1000 speech tokens fits in 1536.
    max_seq_len: int = 1536
    dtype: str = "bf16"
    quant: Any = None  # quant.spec.QuantSpec | None; applied to the Llama backbone (T3.tfmr)
    enforce_eager: bool = False
    graph_batch_sizes: tuple[int, ...] | None = None  # None: default_graph_batch_sizes(max_batch_requests)
    graph_seq_lens: tuple[int, ...] | None = None  # None: default_graph_seq_lens(max_seq_len)
    max_prefill_requests: int = 16  # admitted (and prefilled together) per step
    # One-request prefill graphs per prompt-length bucket; None: default_prefill_lens(max_seq_len), (): none.
    # Every prefill is right-padded to its bucket (graphed or not), so eager and graphed runs stay equal.
    prefill_graph_lens: tuple[int, ...] | None = None
    device: str = "cuda"
    # Decode attention: "masked" (SDPA over the batch's KV bucket with an additive mask: every row reads the
    # bucket's positions) or "padded_keys" (CUDA only: each row reads its own length; one KV bucket suffices);
    # "auto": padded_keys on CUDA. On an H200 padded_keys halved one layer's attention (2.0-2.2x, the same
    # output bits; bench/results/bench_t3_attention.md) and served 101 against 74 audio s/s at 64 streams
    # (bench/results/bench_system_padded_keys.md against bench_system_step_v1.md, one device call).
    decode_attention: str = "auto"
    # torch.compile the decode step's backbone (Inductor fuses its norms, RoPE, residual adds and MLP activation:
    # 767 kernels a step at ~63 requests, most a few microseconds, served on an H200:
    # bench/results/profile_served_step/); the attention kernel runs as it is.
    # Captured in the decode graphs like the eager step. Compiles once per process (dynamic shapes). Served on an
    # H200 it made no more audio: 103.5 against 101.0 audio s/s at 64 streams, 79.9 against 81.5 at 32, within
    # run-to-run spread (bench/results/bench_system_t3compile.md against bench_system_padded_keys.md).
    compile: bool = False

    def __post_init__(self):
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention={self.decode_attention!r}: use one of {DECODE_ATTENTION}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {DTYPES}")
        if self.max_batch_requests < 1:
            raise ValueError(f"max_batch_requests={self.max_batch_requests} must be >= 1")
        if self.max_prefill_requests < 1:
            raise ValueError(f"max_prefill_requests={self.max_prefill_requests} must be >= 1")
        if self.max_seq_len < 64:
            raise ValueError(f"max_seq_len={self.max_seq_len} is too small; T3 prompts alone take ~40+ positions")
        sizes = self.batch_buckets
        if sizes[-1] < self.max_batch_requests:
            raise ValueError(
                f"max_batch_requests={self.max_batch_requests} exceeds the largest graph batch size ({sizes[-1]}); "
                "add it to graph_batch_sizes or set enforce_eager=True"
            )
        if self.seq_buckets[-1] < self.max_seq_len:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} exceeds the largest graph_seq_lens entry ({self.seq_buckets[-1]}); "
                "add it to graph_seq_lens"
            )

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self.graph_batch_sizes or default_graph_batch_sizes(self.max_batch_requests)))

    @property
    def seq_buckets(self) -> tuple[int, ...]:
        if self.graph_seq_lens:
            return tuple(sorted(self.graph_seq_lens))
        if self.attention == "padded_keys":  # rows read their own lengths: buckets would only add graphs
            return (self.max_seq_len,)
        return default_graph_seq_lens(self.max_seq_len)

    @property
    def attention(self) -> str:
        """decode_attention with "auto" resolved for this device."""
        if self.decode_attention == "auto":
            return "padded_keys" if str(self.device).startswith("cuda") else "masked"
        return self.decode_attention

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        lens = default_prefill_lens(self.max_seq_len) if self.prefill_graph_lens is None else self.prefill_graph_lens
        return tuple(sorted(n for n in lens if n <= self.max_seq_len))

    @property
    def max_rows(self) -> int:
        return 2 * self.max_batch_requests


def graphs_unsupported_reason(quant: Any) -> str | None:
    """Why a quantization spec cannot run under CUDA graphs, or None when it can."""
    if quant is None:
        return None
    method = getattr(quant, "method", "none")
    if method == "int8" and float(getattr(quant, "int8_threshold", 0.0)) > 0.0:
        return (
            f"bitsandbytes int8 with int8_threshold={quant.int8_threshold} splits outlier columns with "
            "data-dependent shapes and host syncs, which CUDA graphs cannot capture; use int8_threshold=0.0 "
            "or set enforce_eager=True"
        )
    if method == "dynamic_int8":
        return "dynamic_int8 (torch dynamic quantization) runs on CPU only; set enforce_eager=True"
    return None
