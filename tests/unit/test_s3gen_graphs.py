"""ShapeGraphs' policy on CPU (capture replaced by a recording fake): batch buckets and padding, capture on the
second sighting of a shape, static arguments in the key, LRU eviction, fresh outputs. The real capture runs in
tests/gpu."""
from __future__ import annotations

import numpy as np
import torch

from serve_app.engine.s3gen.graphs import ShapeGraphs, SteppedFlowGraphs, _Graph, _SteppedReplay


def solve(z, mu, mask, spks, cond, n_steps):
    # stands in for FlowRunner.core: row-wise, depends on every input
    return z + mu * mask + spks[:, :, None] + cond + n_steps


def two_outputs(a, b):
    return a * 2, b.sum(dim=-1)


class FakeGraph:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


class RecordingGraphs(ShapeGraphs):
    def _capture(self, inputs, static):
        out = self.fn(**inputs, **static)
        out = out if isinstance(out, tuple) else (out,)

        def replay():
            for o, new in zip(out, (lambda r: r if isinstance(r, tuple) else (r,))(self.fn(**inputs, **static))):
                o.copy_(new)

        return _Graph(FakeGraph(replay), inputs, out)


def _inputs(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(z=torch.randn(B, 80, T, generator=g), mu=torch.randn(B, 80, T, generator=g), mask=torch.ones(B, 1, T),
                spks=torch.randn(B, 80, generator=g), cond=torch.randn(B, 80, T, generator=g))


def test_capture_on_second_call_pads_to_bucket_and_matches_eager():
    graphs = RecordingGraphs(solve, (1, 2, 4), max_graphs=4, capture_after=2)
    a = _inputs(3, 64, 0)
    first = graphs(a, n_steps=10)
    assert graphs.captures == 0 and first.shape == (3, 80, 64)          # first sighting: eager
    second = graphs(a, n_steps=10)
    assert graphs.captures == 1
    (key, g), = graphs.graphs.items()
    assert key[0] == 4 and g.inputs["z"].shape == (4, 80, 64)            # batch 3 padded to bucket 4
    torch.testing.assert_close(g.inputs["z"][3], a["z"][0])             # pad rows: copies of a real row
    torch.testing.assert_close(second, solve(**a, n_steps=10))
    b = _inputs(3, 64, 1)
    out_b = graphs(b, n_steps=10)                                        # replay with new inputs
    torch.testing.assert_close(out_b, solve(**b, n_steps=10))
    torch.testing.assert_close(second, solve(**a, n_steps=10))           # an earlier result is not overwritten
    graphs(a, n_steps=4)                                                 # another static argument: another shape
    assert graphs.captures == 1
    torch.testing.assert_close(graphs(a, n_steps=4), solve(**a, n_steps=4))
    assert graphs.captures == 2


def test_batches_above_the_largest_bucket_stay_eager_and_lru_evicts():
    graphs = RecordingGraphs(solve, (1, 2), max_graphs=2, capture_after=1)
    big = _inputs(5, 32, 0)
    torch.testing.assert_close(graphs(big, n_steps=4), solve(**big, n_steps=4))
    assert graphs.captures == 0
    for T in (32, 64, 96):
        graphs(_inputs(1, T, T), n_steps=4)
    assert graphs.captures == 3 and [k[1][0][1][1] for k in graphs.graphs] == [64, 96]
    graphs(_inputs(1, 64, 7), n_steps=4)                                # a hit refreshes its place
    graphs(_inputs(2, 32, 8), n_steps=4)
    assert [(k[0], k[1][0][1][1]) for k in graphs.graphs] == [(1, 64), (2, 32)]


def test_tuple_outputs():
    graphs = RecordingGraphs(two_outputs, (4,), max_graphs=2, capture_after=1)
    a, b = torch.randn(3, 5), torch.randn(3, 5, 7)
    x, y = graphs(dict(a=a, b=b))
    torch.testing.assert_close(x, a * 2)
    torch.testing.assert_close(y, b.sum(-1))
    assert x.shape == (3, 5) and y.shape == (3, 5)


class RecordingStepped(SteppedFlowGraphs):
    """SteppedFlowGraphs with the CUDA capture replaced: a recorded piece's replay runs it again into the same
    static outputs (the prologue) or in place on them (the euler step), as a graph does."""

    @staticmethod
    def _warm(fn, inputs):
        fn()

    def _record(self, fn):
        out = fn()

        def replay():
            new = fn()
            for o, n in zip(out or (), new or ()):
                o.copy_(n)

        self.recorded.append(fn)
        return FakeGraph(replay), out

    recorded: list


def test_stepped_flow_graphs_replay_the_flow_exactly():
    """A flow graphed as prologue + one euler step replayed n times gives exactly what the flow graphed whole gives
    (same padded batches), over new inputs and batch sizes, and what eager gives up to batch padding's rounding;
    each capture records two pieces, not n + 1."""
    from s3gen_helpers import fresh_s3gen, random_tokens, random_voice

    from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig, VocodeInput
    from serve_app.engine.s3gen.flow import cosine_t_span

    torch.manual_seed(0)
    s3 = fresh_s3gen("tiny")
    cfg = S3GenEngineConfig(n_cfm_timesteps=3)
    eager, whole, stepped = S3GenEngine(s3, cfg), S3GenEngine(s3, cfg), S3GenEngine(s3, cfg)
    whole.use_graphs = stepped.use_graphs = True
    whole.flow.graphs = RecordingGraphs(whole.flow.core, (1, 2, 4), max_graphs=8, capture_after=1)
    f = stepped.flow
    f.graphs = RecordingStepped(f.core, f.prologue, f.euler_step, cosine_t_span, (1, 2, 4), max_graphs=8,
                                capture_after=1)
    f.graphs.recorded = []
    voice = random_voice(10, 1)
    for n_rows, seed in ((3, 0), (3, 1), (1, 2)):       # batch 3 -> bucket 4 (captured, then replayed), batch 1
        items = [VocodeInput(random_tokens(12 + 2 * i, seed * 10 + i), voice, seed=i) for i in range(n_rows)]
        for (a, _), (w, _), (s, _) in zip(eager.step(items), whole.step(items), stepped.step(items)):
            np.testing.assert_array_equal(s, w)
            np.testing.assert_allclose(s, a, atol=1e-4)
    assert f.graphs.captures == whole.flow.graphs.captures == 2 and len(f.graphs.recorded) == 4
    # a real capture's static tensors live in the shared pool: the replay holds every one the step graph reads
    # (x and the four CFG inputs), or the next capture could take their memory
    assert all(len(g.graph.state) == 5 for g in f.graphs.graphs.values())


def test_stepped_replay_sets_each_steps_times():
    calls = []

    class G:
        def __init__(self, name):
            self.name = name

        def replay(self):
            calls.append((self.name, float(t), float(r)))

    t_span = torch.tensor([0.0, 0.25, 0.75, 1.0])
    t, r = torch.zeros(()), torch.zeros(())
    _SteppedReplay(G("prologue"), G("step"), t_span, t, r).replay()
    assert calls == [("prologue", 0.0, 0.0), ("step", 0.0, 0.25), ("step", 0.25, 0.75), ("step", 0.75, 1.0)]
