"""CUDA graphs of a batched function, one per (batch bucket, input shapes, static arguments).

The S3Gen engine graphs two things: the whole flow (encoder + 10-step CFM euler loop, `FlowRunner.core`) and
HiFT's convolution trunk (`HiftRunner.trunk`). At small batches both are launch-bound (the euler loop alone is
~1,000-2,000 kernels a step); a graph replays them in one launch.

Shapes: the batch is padded up to a bucket; pad rows are copies of real rows (at capture) or stale rows of
earlier calls, computed and dropped (rows never mix). Other dimensions must already be bucketed by the caller.
Graphs are captured lazily (or ahead of time, `capture`), share one memory pool and are kept in a bounded LRU;
a batch above the largest bucket, or a shape above `max_size` padded rows x length (compute-bound there, and
its static buffers would be large), runs eagerly. A shape is captured only on its `capture_after`-th call
(eager before): a capture costs about two eager calls, and streams grow through many shapes seen once.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

Key = tuple


@dataclass
class _Graph:
    graph: Any                              # torch.cuda.CUDAGraph (or a test double with .replay())
    inputs: dict[str, torch.Tensor]         # static input buffers, [Bp, ...]
    out: tuple[torch.Tensor, ...]           # static outputs, [Bp, ...]


class ShapeGraphs:
    def __init__(self, fn: Callable[..., Any], batch_buckets: tuple[int, ...], max_graphs: int,
                 capture_after: int = 2, name: str = "fn", max_size: int | None = None):
        self.fn = fn                              # fn(**tensors, **static) -> Tensor | tuple of Tensors, [B, ...]
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.max_graphs = max_graphs
        self.capture_after = max(1, capture_after)
        self.name = name
        self.max_size = max_size                  # padded rows x the first input's last dim; None: no limit
        self.graphs: OrderedDict[Key, _Graph] = OrderedDict()
        self.seen: OrderedDict[Key, int] = OrderedDict()   # calls per shape not yet captured
        self.pool = None
        self.captures = 0

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.batch_buckets if b >= batch), None)

    def _key(self, tensors: dict[str, torch.Tensor], static: dict) -> Key | None:
        """The graph a call would replay, or None when it runs eagerly (no bucket, or above max_size)."""
        first = next(iter(tensors.values()))
        Bp = self.bucket(first.shape[0])
        if Bp is None or (self.max_size is not None and Bp * first.shape[-1] > self.max_size):
            return None
        return (Bp, tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in tensors.items()),
                tuple(sorted(static.items())))

    def capture(self, tensors: dict[str, torch.Tensor], **static) -> bool:
        """Capture this call's shape now, ahead of traffic (a warm-up). -> whether a graph was captured."""
        key = self._key(tensors, static)
        if key is None or key in self.graphs:
            return False
        self.seen.pop(key, None)
        self._add(key, tensors, static)
        return True

    def _add(self, key: Key, tensors: dict[str, torch.Tensor], static: dict) -> _Graph:
        """Capture `key`'s graph on buffers padded from `tensors`, evicting the least recently used if full."""
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        g = self.graphs[key] = self._capture(self._padded(tensors, key[0]), static)
        self.captures += 1
        return g

    def __call__(self, tensors: dict[str, torch.Tensor], **static):
        # tensors: name -> [B, ...] (same B) -> fn's output(s), [B, ...], fresh tensors
        B = next(iter(tensors.values())).shape[0]
        key = self._key(tensors, static)
        if key is None:
            return self.fn(**tensors, **static)
        g = self.graphs.get(key)
        if g is None:
            n = self.seen.pop(key, 0) + 1
            if n < self.capture_after:
                self.seen[key] = n
                while len(self.seen) > 4 * self.max_graphs:
                    self.seen.popitem(last=False)
                return self.fn(**tensors, **static)
            g = self._add(key, tensors, static)
            log.info("captured %s CUDA graph: batch %d, %s (%d held)", self.name, key[0],
                     {k: tuple(v.shape[1:]) for k, v in tensors.items()}, len(self.graphs))
        else:
            self.graphs.move_to_end(key)
        for name, value in tensors.items():
            g.inputs[name][:B].copy_(value)
        g.graph.replay()
        out = tuple(o[:B].clone() for o in g.out)   # the next replay of any graph in the pool may reuse g.out
        return out if len(out) > 1 else out[0]

    @staticmethod
    def _padded(tensors: dict[str, torch.Tensor], Bp: int) -> dict[str, torch.Tensor]:
        # static buffers [Bp, ...]: the real rows, then copies of row 0 (valid inputs: no NaN in pad rows)
        out = {}
        for name, v in tensors.items():
            buf = v[:1].expand(Bp, *v.shape[1:]).clone()
            buf[:v.shape[0]].copy_(v)
            out[name] = buf
        return out

    def _capture(self, inputs: dict[str, torch.Tensor], static: dict) -> _Graph:
        device = next(iter(inputs.values())).device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.fn(**inputs, **static)   # warm-up outside the graph: kernel selection, allocator, lazy buffers
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(**inputs, **static)
        self.pool = graph.pool()
        return _Graph(graph, inputs, out if isinstance(out, tuple) else (out,))
