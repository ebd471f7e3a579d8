"""What the stage shims share: resolving the quantization strategy for a replica and applying it."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


CPU_DEFAULT_QUANTIZATION = "dynamic"   # torch dynamic int8, the fast CPU path (quant/strategies.py)


class EngineTotals:
    """An engine's running totals exported as Ray counters: each `export` adds to a counter what its total grew by
    since the last call (Ray's Counter can only be incremented, and refuses 0)."""

    def __init__(self, tags: dict[str, str]):
        self.tags = tags
        self._seen: dict[str, float] = {}

    def export(self, totals: list[tuple[Any, str, float | None]]) -> None:
        # totals: (counter, key, the engine's running total or None)
        for counter, key, value in totals:
            last = self._seen.get(key, 0)
            if value is not None and value > last:
                counter.inc(value - last, tags=self.tags)
                self._seen[key] = value


def resolve_quant(strategy: str | None, device: str, stage: str) -> dict[str, Any]:
    """{component: QuantSpec} for a replica on `device`. On CPU: unset or 'auto' means torch dynamic int8, and
    a strategy that needs bitsandbytes is ignored with a warning (a GPU config fell back to CPU)."""
    if strategy == "none" or (not strategy and device == "cuda"):
        return {}
    if device != "cuda" and strategy in (None, "", "auto"):
        log.info("%s: CPU replica: quantization %r -> %r (set 'none' for fp32)", stage, strategy,
                 CPU_DEFAULT_QUANTIZATION)
        strategy = CPU_DEFAULT_QUANTIZATION
    from quant import resolve_strategy

    specs = resolve_strategy(strategy, device=device)
    if device != "cuda" and any(spec.is_bnb for spec in specs.values()):
        log.warning("%s: quantization %r ignored: bitsandbytes needs CUDA here and this replica runs on %s",
                    stage, strategy, device)
        return {}
    return specs


def spec_for(specs: dict[str, Any], component: str) -> Any:
    """The spec of one component, or None when it stays unquantized."""
    spec = specs.get(component)
    return None if spec is None or getattr(spec, "method", "none") == "none" else spec


def describe(specs: dict[str, Any], components: tuple[str, ...]) -> str:
    """'t3=nf4/bf16, t3_extra=none' for the memory report and start-up log."""
    parts = []
    for key in components:
        spec = specs.get(key)
        parts.append(f"{key}={getattr(spec, 'method', 'none')}" + (f"/{spec.dtype}" if spec is not None else ""))
    return ", ".join(parts) if specs else "none"


def quantize_upstream(specs: dict[str, Any], **roots: Any) -> dict[str, int]:
    """quant.components.quantize_model on upstream modules; -> {component: number of Linear layers replaced}."""
    if not specs:
        return {}
    from quant.components import quantize_model

    done = quantize_model({k: v for k, v in specs.items()}, **roots)
    return {k: len(v) for k, v in done.items()}


def log_stage_ready(stage: str, seconds: float, backend: str, rd: Any, checkpoint: Any) -> None:
    """A model stage replica's start-up line: backend, device, dtype, quantization and weights."""
    log.info("%s stage ready in %.1fs: backend=%s device=%s dtype=%s quantization=%s weights=%s", stage, seconds,
             backend, rd.device, rd.dtype, rd.quantization.get(stage.lower(), "none"),
             checkpoint.describe() if hasattr(checkpoint, "describe") else checkpoint)


def configure_replica_logging() -> None:
    """Inside a Serve replica, send our INFO logs (device, weights, quantization at start-up) to stderr, which
    Ray forwards to the driver's console; Ray configures only its own loggers there."""
    try:
        from ray.serve.context import _get_internal_replica_context

        if _get_internal_replica_context() is None:
            return
    except Exception:
        return
    from serve_app.envs import get_envs

    root = logging.getLogger("serve_app")
    if not any(getattr(h, "_chatterbox", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._chatterbox = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False   # one line a record: in a replica the root logger has a handler of its own too (every
    # S3Gen step line came twice in the served H200 runs' server logs, the second as "INFO:name:message")
    root.setLevel(get_envs().log_level.upper())
