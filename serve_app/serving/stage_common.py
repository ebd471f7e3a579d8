"""What the three stage shims share: quantization lookup, start-up logging."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def quant_spec(strategy: str | None, component: str, device: str) -> Any:
    """The QuantSpec the strategy gives `component` on `device`, or None (no strategy, CPU, or not covered)."""
    if not strategy or device != "cuda":
        if strategy and device != "cuda":
            log.warning("quantization %r ignored for %s: it needs CUDA (this replica runs on %s)",
                        strategy, component, device)
        return None
    from quant import resolve_strategy

    specs = resolve_strategy(strategy, device=device)
    spec = specs.get(component) if isinstance(specs, dict) else None
    method = getattr(spec, "method", None)
    return None if spec is None or method in (None, "none") else spec


def apply_quant_pass(module: Any, spec: Any, component: str) -> str:
    """Run quant.apply_quant on a module; returns a short description for memory reports and logs."""
    if spec is None:
        return "none"
    from quant import apply_quant

    changed = apply_quant(module, spec)
    desc = f"{getattr(spec, 'method', spec)} ({len(changed)} layers)"
    log.info("%s: quantized %s", component, desc)
    return desc


def describe_spec(spec: Any) -> str:
    return "none" if spec is None else str(getattr(spec, "method", spec))
