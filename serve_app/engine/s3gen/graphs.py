"""CUDA graphs of the CFM euler loop (`FlowRunner.solve`), one per (batch bucket, mel frames, steps).

At small batches the 10-step loop is launch-bound: ~2,000 kernels a call, about 60 ms on an H100 in eager mode
whatever the length. A graph replays them in one launch. Shapes: the batch is padded up to a bucket (pad rows
carry stale inputs of earlier calls, are computed and dropped: rows never mix); the frame count is already a
multiple of the engine's length bucket. Graphs are captured lazily, share one memory pool and are kept in a
bounded LRU; a batch above the largest bucket runs eagerly. A shape is captured only on its `capture_after`-th
call (eager before): a capture costs about two eager calls, and streams grow through many shapes seen once.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]   # static input buffers, [Bp, ...]
    out: torch.Tensor                 # static output [Bp, 80, T] float32


class SolveGraphs:
    def __init__(self, solve: Callable[..., torch.Tensor], batch_buckets: tuple[int, ...], max_graphs: int,
                 capture_after: int = 2):
        self.solve = solve                        # solve(z, mu, mask, spks, cond, n_steps) -> x [B, 80, T]
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.max_graphs = max_graphs
        self.capture_after = max(1, capture_after)
        self.graphs: OrderedDict[tuple[int, int, int], _Graph] = OrderedDict()
        self.seen: OrderedDict[tuple[int, int, int], int] = OrderedDict()   # calls per shape not yet captured
        self.pool = None
        self.captures = 0

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.batch_buckets if b >= batch), None)

    def __call__(self, z, mu, mask, spks, cond, n_steps: int) -> torch.Tensor:
        # z, mu, cond: [B, 80, T] float32; mask: [B, 1, T]; spks: [B, 80] -> x [B, 80, T] float32 (a fresh tensor)
        B, _, T = z.shape
        Bp = self.bucket(B)
        if Bp is None:
            return self.solve(z, mu, mask, spks, cond, n_steps)
        key = (Bp, T, n_steps)
        g = self.graphs.get(key)
        if g is None:
            n = self.seen.pop(key, 0) + 1
            if n < self.capture_after:
                self.seen[key] = n
                while len(self.seen) > 4 * self.max_graphs:
                    self.seen.popitem(last=False)
                return self.solve(z, mu, mask, spks, cond, n_steps)
            g = self._capture(key, z.device)
        else:
            self.graphs.move_to_end(key)
        for name, value in (("z", z), ("mu", mu), ("mask", mask), ("spks", spks), ("cond", cond)):
            g.inputs[name][:B].copy_(value)
        g.graph.replay()
        return g.out[:B].clone()   # the next replay of any graph in the pool may reuse this memory

    def _capture(self, key: tuple[int, int, int], device: torch.device) -> _Graph:
        Bp, T, n_steps = key
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        inputs = {"z": torch.zeros(Bp, 80, T, device=device), "mu": torch.zeros(Bp, 80, T, device=device),
                  "mask": torch.ones(Bp, 1, T, device=device), "spks": torch.zeros(Bp, 80, device=device),
                  "cond": torch.zeros(Bp, 80, T, device=device)}
        args = (inputs["z"], inputs["mu"], inputs["mask"], inputs["spks"], inputs["cond"], n_steps)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.solve(*args)   # warm-up outside the graph: kernel selection, allocator
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.solve(*args)
        self.pool = graph.pool()
        self.captures += 1
        log.info("captured flow CUDA graph: batch %d, %d mel frames, %d steps (%d held)", Bp, T, n_steps,
                 len(self.graphs) + 1)
        g = _Graph(graph, inputs, out)
        self.graphs[key] = g
        return g
