"""The device one stage replica runs on: its GPU share, the memory cap that enforces it, and its memory report.

A replica given `num_gpus` < 1 shares its GPU with other replicas; Ray only does the bookkeeping, so the
replica caps its own allocator with `torch.cuda.set_per_process_memory_fraction(num_gpus)`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ReplicaDevice:
    stage: str
    device: str                      # "cpu" | "cuda"
    num_gpus: float = 0.0
    dtype: str = "float32"
    quantization: dict[str, str] = field(default_factory=dict)   # component -> what was applied

    @classmethod
    def setup(cls, stage: str, device: str, num_gpus: float, dtype: str = "float32") -> ReplicaDevice:
        if device == "cuda" and not torch.cuda.is_available():
            log.warning("%s: asked for CUDA but this replica sees no GPU; running on CPU", stage)
            device = "cpu"
        if device == "cpu" and dtype != "float32":
            log.warning("%s: dtype %s on CPU is slow or unsupported; using float32", stage, dtype)
            dtype = "float32"
        rd = cls(stage=stage, device=device, num_gpus=num_gpus if device == "cuda" else 0.0, dtype=dtype)
        if rd.device == "cuda" and 0 < rd.num_gpus < 1:
            torch.cuda.set_per_process_memory_fraction(rd.num_gpus)
            total = torch.cuda.get_device_properties(0).total_memory
            log.info("%s: capped CUDA memory to %.2f of the GPU (%.2f GiB of %.2f GiB)", stage, rd.num_gpus,
                     rd.num_gpus * total / 2**30, total / 2**30)
        return rd

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def memory_report(self) -> dict:
        """Per-replica memory as the router's GET /v1/memory shows it."""
        report: dict = {"stage": self.stage, "pid": os.getpid(), "device": self.device, "dtype": self.dtype,
                        "quantization": dict(self.quantization), "num_gpus": self.num_gpus}
        if self.device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            report.update(
                gpu_name=torch.cuda.get_device_name(0),
                allocated_bytes=int(torch.cuda.memory_allocated()),
                reserved_bytes=int(torch.cuda.memory_reserved()),
                max_allocated_bytes=int(torch.cuda.max_memory_allocated()),
                budget_bytes=int(total * (self.num_gpus if 0 < self.num_gpus < 1 else 1)),
                gpu_total_bytes=int(total),
            )
        else:
            report.update(allocated_bytes=0, reserved_bytes=0, budget_bytes=0)
        return report

    def export_metrics(self) -> None:
        if self.device != "cuda":
            return
        from serve_app.serving.metrics import get_metrics

        m, r, tags = get_metrics(), self.memory_report(), {"stage": self.stage}
        m.gpu_memory_allocated_bytes.set(r["allocated_bytes"], tags=tags)
        m.gpu_memory_reserved_bytes.set(r["reserved_bytes"], tags=tags)
        m.gpu_memory_budget_bytes.set(r["budget_bytes"], tags=tags)
