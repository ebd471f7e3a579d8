"""Fast T3 engine (issue 4): plain torch, continuous batching, static slot KV cache, CUDA-graph decode.

Names are imported lazily so the torch-free bookkeeping modules (sequence, slot_allocator, scheduler) load
without torch or chatterbox.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "T3Engine": ".engine",
    "T3EngineConfig": ".config",
    "T3Conditioning": ".request",
    "T3GenerationRequest": ".request",
    "T3StepOutput": ".request",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
