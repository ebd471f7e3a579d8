"""Engine configuration and per-request input for the S3Gen engine (speech tokens -> 24 kHz audio)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SAMPLE_RATE = 24_000
MEL_FRAMES_PER_TOKEN = 2          # flow.token_mel_ratio: 25 tokens/s -> 50 mel frames/s
SAMPLES_PER_MEL_FRAME = 480       # HiFT upsampling 8 * 5 * 3 * istft hop 4
SAMPLES_PER_TOKEN = MEL_FRAMES_PER_TOKEN * SAMPLES_PER_MEL_FRAME  # 960
PRE_LOOKAHEAD_TOKENS = 3          # flow.pre_lookahead_len: held back until finalize

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class S3GenEngineConfig:
    """How the engine runs. `dtype` applies to the CFM estimator (the bulk of the work); the flow encoder follows
    it in bf16 and is fp32 otherwise, HiFT stays fp32, unless `encoder_dtype` / `hift_dtype` say otherwise.

    `stream_context_tokens` (C) trades flow work for continuity at stream joins. A stream step of n new tokens
    runs the flow on C + n + 3 tokens (+ the prompt): (C + n + 3) / n flow tokens per token. At the server's
    blocks (first 25, then >= 50), C=6: 1.12 for the first (no context yet), 1.18 at 50, 1.09 at 100, 1.14 over a
    200-token stream (25, 50, 100, last 25); C=8: 1.22 at 50, 1.17 over that stream; C=4: 1.14 at 50.
    Stream vs one-shot LSD in dB on random weights, 3 CFM steps (another seed: 7.1 dB):

        C                      0      4      6      8      16     32     old full-prefix re-run
        tiny, steps of 10      3.03   2.72   2.75   2.77   2.83   2.84   1.22   (40 tokens, 3 voices)
        tiny, 120 in 10s       3.55   3.20   3.18   3.16   3.12   3.15   1.52
        tiny, server blocks    2.02   1.95   1.94   1.95   2.05   2.17   1.03   (200 tokens: 25, 50, 100)
        full, steps of 10      3.40   2.99   2.98   3.01   3.04   3.13   1.45   (100 tokens, 1 voice)
        full, server blocks    2.05   1.95   1.97   1.99   2.14   2.34   1.02   (25, 50, 25)

    No context is clearly worse, 4-8 are alike, more is no better on random weights (they react to the context
    mel given as condition, which a one-shot decode never has: hence the gap to the old re-run, spread evenly
    over a step's frames rather than at the joins). 6 is the most context within 1.2 flow tokens per token at
    50-token blocks. Trained weights were not measured: raise C if joins sound discontinuous."""

    dtype: str = "fp32"                  # "fp32" | "bf16" | "fp16": CFM estimator compute dtype
    n_cfm_timesteps: int = 10            # euler steps (upstream default 10)
    quant: Any = None                    # quant.spec.QuantSpec for the flow (encoder + estimator), or None
    device: str | None = None            # None: the s3gen module's device
    max_batch_tokens: int = 32_768       # padded (prompt + speech) tokens in one flow call
    length_bucket: int = 32              # flow batch length is rounded up to a multiple of this (tokens)
    encoder_dtype: str | None = None     # flow encoder dtype. None: "bf16" when dtype is bf16 (H100: the same
                                         # distance from fp32 and 1.4 ms off a first chunk), else "fp32"
    hift_dtype: str = "fp32"             # HiFT vocoder dtype (cheap; see bench)
    default_seed: int = 0                # CFM noise / HiFT source noise when a request brings no seed
    stream_overlap_frames: int = 8       # mel frames re-vocoded and crossfaded at each stream join (160 ms)
    stream_context_tokens: int = 6       # C: already vocoded tokens a stream step runs the flow on again, their
                                         # mel as condition (streaming.py); see the class docstring
    stream_prompt_tokens: int | None = None  # a stream's later steps condition on only the voice prompt's last
                                         # this many tokens (None: all, up to 150). The prompt is most of a
                                         # step's flow work (150 of ~200 tokens at 40 new). Costs fidelity:
                                         # see the test
    prompt_tokens: int | None = None     # the same for one-shot decodes and a stream's first step (None: all).
                                         # With both at K the whole stream conditions on the same K tokens.
                                         # K=50 served on an H200: more audio; alone it cost stall-free
                                         # streams, with the scheduler's first_step_predict it did not
                                         # (bench/results/bench_system_prompt50.md, bench_system_9fd36ca.md;
                                         # deploy/gpu-1x.yaml sets 50)
    cfg_rate: float | None = None        # None: upstream inference_cfg_rate (0.7)
    enforce_eager: bool = False          # True: no CUDA graphs for the flow's euler loop (CUDA only anyway)
    flow_graph_unit: str = "step"        # "loop": one flow graph per shape holds all n euler steps; "step": one of
                                         # the prologue and one of a single step, replayed n times (~1/n of the
                                         # kernels to capture). Served on an H200 (gpu-1x), "step" had the app
                                         # ready in 87-97 s against 150 s, at the same audio s/s (graphs.SteppedFlowGraphs;
                                         # bench/results/bench_system_step_v1.md)
    graph_batch_sizes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # flow / HiFT batches are
                                         # padded up to these (pad rows are computed); larger ones run eagerly
    graph_max_tokens: int = 16_384       # flow graphs only for padded rows x tokens up to this (eager above:
                                         # compute-bound there, and a graph's static buffers grow with it)
    hift_graph_max_frames: int = 2_048   # HiFT graphs only for padded rows x mel frames up to this
    batch_overhead_tokens: int = 256     # the fixed cost of one more flow call, in row-tokens: the step's rows
                                         # are split into calls that minimise padding + this (batching.py); HiFT
                                         # uses twice it in frames. From bench_s3gen.md (H100, bf16, 300-token
                                         # rows): batch 8 in 165 ms, batch 32 in 617 ms -> ~14 ms a call + ~63 us
                                         # a row-token, HiFT included
    compile: bool = False                # torch.compile the CFM estimator (fuses its small kernels; a slow
                                         # warm-up: ~2 min on an H100 with compile_dynamic). Served on an H200:
                                         # no more audio, app ready in 228 against 98 s
                                         # (bench/results/bench_system_s3compile.md)
    compile_dynamic: bool = True         # compile once for all lengths and batches (False: once per shape)
    compile_hift: bool = False           # torch.compile HiFT's conv trunk (fuses its Snake activations and masks)
    fast_estimator: bool = True          # FastEstimator: upstream's estimator math with half its kernels
    hift_length_bucket: int = 16         # HiFT rows are padded (masked) to a multiple of this many mel frames
    graph_capture_after: int = 2         # a flow shape is captured at its 2nd call (eager at the 1st)
    max_graphs: int = 32                 # captured (batch, frames, steps) shapes kept, least recently used dropped

    def __post_init__(self):
        if self.encoder_dtype is None:
            object.__setattr__(self, "encoder_dtype", "bf16" if self.dtype == "bf16" else "fp32")
        for name in ("dtype", "encoder_dtype", "hift_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(DTYPES)}")
        if self.n_cfm_timesteps < 1:
            raise ValueError(f"n_cfm_timesteps={self.n_cfm_timesteps} must be >= 1 (upstream uses 10)")
        if self.max_batch_tokens < 64:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} is too small; use >= 64 (e.g. 32768)")
        if self.flow_graph_unit not in ("loop", "step"):
            raise ValueError(f"flow_graph_unit={self.flow_graph_unit!r}: use 'loop' or 'step'")
        if self.hift_length_bucket < 1:
            raise ValueError(f"hift_length_bucket={self.hift_length_bucket} must be >= 1 (e.g. 16)")
        if self.batch_overhead_tokens < 0:
            raise ValueError(f"batch_overhead_tokens={self.batch_overhead_tokens} must be >= 0 (e.g. 256)")
        if self.length_bucket < 1:
            raise ValueError(f"length_bucket={self.length_bucket} must be >= 1")
        for name in ("stream_prompt_tokens", "prompt_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 or None (all)")
        if self.stream_context_tokens < 0:
            raise ValueError(f"stream_context_tokens={self.stream_context_tokens} must be >= 0 (e.g. 8)")
        if self.stream_overlap_frames < 1:
            raise ValueError(f"stream_overlap_frames={self.stream_overlap_frames} must be >= 1 (e.g. 8)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class VocodeInput:
    """One request for the engine.

    speech_tokens: 1-D ints (< 6561), list / np.ndarray / torch.Tensor (`tokens=` is accepted as an alias).
    conds: upstream `Conditionals.gen` dict (prompt_token [1, P], prompt_token_len [1], prompt_feat [1, F, 80],
           embedding [1, 192]), ideally already on the engine's device (`S3GenEngine.prepare_conds`).
    seed: CFM and HiFT noise seed; the same seed gives the same audio alone or in any batch.
    finalize / stream_state: streaming (see `S3GenEngine.step`); one-shot is finalize=True, stream_state=None.
    """

    __slots__ = ("speech_tokens", "conds", "seed", "finalize", "stream_state")

    def __init__(self, speech_tokens=None, conds: dict | None = None, seed: int | None = None,
                 finalize: bool = True, stream_state=None, *, tokens=None):
        if speech_tokens is None:
            speech_tokens = tokens
        if speech_tokens is None or conds is None:
            raise ValueError("VocodeInput needs speech_tokens (or tokens=) and conds")
        self.speech_tokens = speech_tokens
        self.conds = conds
        self.seed = seed
        self.finalize = finalize
        self.stream_state = stream_state

    def __repr__(self) -> str:
        return (f"VocodeInput(num_tokens={len(self.speech_tokens)}, seed={self.seed}, "
                f"finalize={self.finalize}, streaming={self.stream_state is not None})")
