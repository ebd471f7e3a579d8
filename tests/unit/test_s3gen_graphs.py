"""SolveGraphs' policy on CPU (capture replaced by a recording fake): batch buckets and padding, capture on the
second sighting of a shape, LRU eviction, fresh outputs. The real capture runs in tests/gpu."""
from __future__ import annotations

import torch

from serve_app.engine.s3gen.graphs import SolveGraphs, _Graph


def solve(z, mu, mask, spks, cond, n_steps):
    # stands in for FlowRunner.solve: row-wise, depends on every input
    return z + mu * mask + spks[:, :, None] + cond + n_steps


class FakeGraph:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


class RecordingGraphs(SolveGraphs):
    def _capture(self, key, device):
        Bp, T, n_steps = key
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        inputs = {"z": torch.zeros(Bp, 80, T), "mu": torch.zeros(Bp, 80, T), "mask": torch.ones(Bp, 1, T),
                  "spks": torch.zeros(Bp, 80), "cond": torch.zeros(Bp, 80, T)}
        out = torch.zeros(Bp, 80, T)
        args = [inputs[k] for k in ("z", "mu", "mask", "spks", "cond")]
        g = _Graph(FakeGraph(lambda: out.copy_(solve(*args, n_steps))), inputs, out)
        self.captures += 1
        self.graphs[key] = g
        return g


def _inputs(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 80, T, generator=g), torch.randn(B, 80, T, generator=g), torch.ones(B, 1, T),
            torch.randn(B, 80, generator=g), torch.randn(B, 80, T, generator=g))


def test_capture_on_second_call_pads_to_bucket_and_matches_eager():
    graphs = RecordingGraphs(solve, (1, 2, 4), max_graphs=4, capture_after=2)
    a = _inputs(3, 64, 0)
    first = graphs(*a, 10)
    assert graphs.captures == 0 and first.shape == (3, 80, 64)          # first sighting: eager
    second = graphs(*a, 10)
    assert graphs.captures == 1 and (4, 64, 10) in graphs.graphs        # batch 3 padded to bucket 4
    torch.testing.assert_close(second, solve(*a, 10))
    b = _inputs(3, 64, 1)
    out_b = graphs(*b, 10)                                              # replay with new inputs
    torch.testing.assert_close(out_b, solve(*b, 10))
    torch.testing.assert_close(second, solve(*a, 10))                   # an earlier result is not overwritten
    small = _inputs(1, 64, 2)
    graphs(*small, 10)
    torch.testing.assert_close(graphs(*small, 10), solve(*small, 10))
    assert graphs.captures == 2


def test_batches_above_the_largest_bucket_stay_eager_and_lru_evicts():
    graphs = RecordingGraphs(solve, (1, 2), max_graphs=2, capture_after=1)
    big = _inputs(5, 32, 0)
    torch.testing.assert_close(graphs(*big, 4), solve(*big, 4))
    assert graphs.captures == 0
    for T in (32, 64, 96):
        graphs(*_inputs(1, T, T), 4)
    assert graphs.captures == 3 and list(graphs.graphs) == [(1, 64, 4), (1, 96, 4)]
    graphs(*_inputs(1, 64, 7), 4)                                       # a hit refreshes its place
    graphs(*_inputs(2, 32, 8), 4)
    assert list(graphs.graphs) == [(1, 64, 4), (2, 32, 4)]
