"""T3EngineStats: the engine's running counters, read (and turned into metrics) by the serving layer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class T3EngineStats:
    """Totals since the engine was built; only ever grow. Pure Python.

    A decode step's attention reads the KV of every cache row it runs (the slot bucket, two rows a request, holes
    and pad rows included): with decode_attention "masked" at every position of its KV-length bucket (the batch's
    longest request, rounded up), with "padded_keys" at each row's own positions (a pad row: one).
    kv_positions_read / kv_positions_used is how much of that traffic the requests needed."""

    num_decode_steps: int = 0
    kv_positions_read: int = 0    # sum over decode steps of the positions attention read (see above)
    kv_positions_used: int = 0    # sum over decode steps of the running requests' rows x their own lengths

    @property
    def kv_read_ratio(self) -> float:
        return self.kv_positions_read / self.kv_positions_used if self.kv_positions_used else 0.0
