"""Host -> device copies that do not wait for the GPU.

A plain `cpu_tensor.to("cuda")` from pageable memory synchronizes the stream (PyTorch copies, then waits), so a
copy made between two GPU stages stalls the host until the first stage is done: in the engine's step the HiFT
lengths copy made HiFT's host-side work (f0, source, STFT: ~100 eager ops) start only after the flow's graph had
finished on the GPU. Staged through pinned memory with `non_blocking=True` the copy is queued instead, and the
host runs ahead. (PyTorch's pinned allocator keeps the staging buffer alive until the copy has run.)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_device(values: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A list / numpy array / tensor -> a tensor on `device` (dtype converted on the host), queued, not waited for."""
    if torch.is_tensor(values):
        t = values
    elif isinstance(values, np.ndarray):
        t = torch.from_numpy(values)
    else:
        t = torch.tensor(values)
    if dtype is not None:
        t = t.to(dtype)
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
