"""S3GenEngineStats: the engine's running counters, read (and turned into metrics) by the serving layer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class S3GenEngineStats:
    """Totals since the engine was built; only ever grow. Pure Python.

    num_flow_tokens / num_tokens_in is the flow work per token of audio: 1.0 for one-shot decodes; a stream step
    adds its left context (<= stream_context_tokens) and, until finalize, the 3 look-ahead tokens."""

    num_tokens_in: int = 0        # new speech tokens that produced audio (a stream step's new ones; a one-shot's all)
    num_flow_tokens: int = 0      # speech tokens through the flow, prompt excluded: context + new + look-ahead
    num_flow_rows: int = 0        # rows run through the flow (a request's part of a step that had new frames)
    num_flow_row_tokens: int = 0  # tokens of those rows, prompt and context included (what the flow had to run)
    num_flow_padded_tokens: int = 0   # row-tokens the flow computed: padded lengths x padded (graph) batch rows
    num_flow_calls: int = 0       # flow calls (a step's rows are split into calls by length, batching.py)
    num_steps: int = 0            # calls of `S3GenEngine.step` with a non-empty batch
    busy_seconds: float = 0.0     # wall time inside `step` (ends with the audio on the host: GPU time included)

    @property
    def flow_tokens_per_token(self) -> float:
        return self.num_flow_tokens / self.num_tokens_in if self.num_tokens_in else 0.0

    @property
    def flow_padding_ratio(self) -> float:
        """Row-tokens computed per row-token needed (1.0: no padding)."""
        return self.num_flow_padded_tokens / self.num_flow_row_tokens if self.num_flow_row_tokens else 0.0
