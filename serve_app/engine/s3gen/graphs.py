"""CUDA graphs of a batched function, one per (batch bucket, input shapes, static arguments).

The S3Gen engine graphs two things: the whole flow (encoder + 10-step CFM euler loop, `FlowRunner.core`) and
HiFT's convolution trunk (`HiftRunner.trunk`). At small batches both are launch-bound (the euler loop alone is
~1,000-2,000 kernels a step); a graph replays them in one launch. `SteppedFlowGraphs` graphs the flow as two
pieces per shape instead (the prologue, and one euler step replayed n times): faster to capture.

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
        self._warm(lambda: self.fn(**inputs, **static), inputs)
        graph, out = self._record(lambda: self.fn(**inputs, **static))
        return _Graph(graph, inputs, out if isinstance(out, tuple) else (out,))

    @staticmethod
    def _warm(fn: Callable[[], Any], inputs: dict[str, torch.Tensor]) -> None:
        """Run once outside any graph, on a side stream: kernel selection, allocator, lazy buffers."""
        device = next(iter(inputs.values())).device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)

    def _record(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """Capture `fn` into a CUDA graph of the shared pool. -> (graph, fn's output: the graph's static output)
        thread_local: another thread's CUDA calls during the capture (the replica's other threads: a voice's conds
        moved to the GPU, a host copy) neither fail nor invalidate it, as in the T3 engine's graph_runner."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        self.pool = graph.pool()
        return graph, out


class _SteppedReplay:
    """Replays a flow call from two graphs: the prologue (encoder, CFG inputs, x = z), then one Euler step n times,
    its time buffers set to each step's t and r between replays (two 4-byte device copies a step)."""

    def __init__(self, prologue: Any, step: Any, t_span: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                 state: tuple[torch.Tensor, ...] = ()):
        self.prologue, self.step, self.t_span, self.t, self.r = prologue, step, t_span, t, r
        # the prologue's static outputs, which the step graph reads: held for the graphs' life, or the shared
        # pool would hand their memory to the next capture
        self.state = state

    def replay(self) -> None:
        self.prologue.replay()
        for k in range(self.t_span.shape[0] - 1):
            self.t.copy_(self.t_span[k])
            self.r.copy_(self.t_span[k + 1])
            self.step.replay()


class SteppedFlowGraphs(ShapeGraphs):
    """ShapeGraphs of the flow (`FlowRunner.core`: prologue, then n Euler steps) that capture, per shape, one graph
    of the prologue and one of a single Euler step, replayed n times, instead of one graph of all of it: about
    1/n of the kernels captured and instantiated per shape (the whole loop is ~9k kernel nodes), so a replica's
    grid of graphs is captured that much sooner, for n - 1 more graph launches per call. Same arithmetic as
    `core`, in the same order. Calls that run eagerly run `core` itself."""

    def __init__(self, core: Callable[..., torch.Tensor], prologue: Callable[..., tuple],
                 step: Callable[..., None], t_span: Callable[[int, torch.device], torch.Tensor],
                 batch_buckets: tuple[int, ...], max_graphs: int, capture_after: int = 2, name: str = "flow",
                 max_size: int | None = None):
        super().__init__(core, batch_buckets, max_graphs, capture_after, name, max_size)
        self.prologue_fn = prologue     # FlowRunner.prologue: core's tensors -> (x, mask_in, mu_in, spks_in, cond_in)
        self.step_fn = step             # FlowRunner.euler_step: (x, cfg inputs..., t, r) -> None, x in place
        self.t_span_fn = t_span         # (n_steps, device) -> [n_steps + 1] float32: core's Euler times

    def _capture(self, inputs: dict[str, torch.Tensor], static: dict) -> _Graph:
        device = next(iter(inputs.values())).device
        t_span = self.t_span_fn(static["n_steps"], device)
        t, r = t_span[0].clone(), t_span[1].clone()        # the step graph's time buffers, [] float32
        self._warm(lambda: self.step_fn(*self.prologue_fn(**inputs), t, r), inputs)
        prologue, state = self._record(lambda: self.prologue_fn(**inputs))   # state: static (x, cfg inputs)
        step, _ = self._record(lambda: self.step_fn(*state, t, r))
        return _Graph(_SteppedReplay(prologue, step, t_span, t, r, state), inputs, (state[0],))
