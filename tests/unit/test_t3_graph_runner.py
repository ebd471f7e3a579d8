"""DecodeGraphs plumbing on CPU with a fake CUDA graph API: buckets captured largest first into one pool,
replay runs the captured shape, and the sampler-outside-the-graph fallback gives the same tokens."""
import contextlib

import pytest
import torch

from serve_app.engine.t3 import T3Conditioning, T3Engine, T3EngineConfig, T3GenerationRequest
from serve_app.engine.t3 import graph_runner
from serve_app.engine.t3.graph_runner import DecodeGraphs, PrefillGraphs, pick_bucket


class _FakeGraph:
    current = None

    def __init__(self):
        self.calls = []  # what ran while "capturing"

    def replay(self):
        for fn, args in self.calls:
            fn(*args)

    def pool(self):
        return "shared-pool"


@pytest.fixture
def fake_cuda(monkeypatch):
    pools = []

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode="global"):
        pools.append(pool)
        _FakeGraph.current = g
        try:
            yield
        finally:
            _FakeGraph.current = None

    monkeypatch.setattr(graph_runner.torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(graph_runner.torch.cuda, "graph", graph)
    monkeypatch.setattr(graph_runner.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(graph_runner.torch.cuda, "empty_cache", lambda: None)
    return pools


def _recording(fn):
    def wrapped(*args):
        if _FakeGraph.current is not None:
            _FakeGraph.current.calls.append((fn, args))
        else:
            fn(*args)
    return wrapped


def test_pick_bucket():
    assert pick_bucket((1, 2, 4, 8), 3) == 4 and pick_bucket((1, 2, 4, 8), 8) == 8
    with pytest.raises(ValueError):
        pick_bucket((1, 2), 3)


def test_kv_buckets_keep_a_batch_near_its_longest_request():
    """Decode reads every position of the batch's KV bucket for every row: the default buckets round a batch's
    longest request up by at most 128 positions to 1024 (256 beyond), not to the next power of two."""
    from serve_app.engine.t3.config import default_graph_seq_lens

    buckets = default_graph_seq_lens(1536)
    assert buckets[0] == 256 and buckets[-1] == 1536 and list(buckets) == sorted(set(buckets))
    assert pick_bucket(buckets, 520) == 640 and pick_bucket(buckets, 1030) == 1280
    assert all(pick_bucket(buckets, n) - n < (128 if n <= 1024 else 256) for n in range(257, 1537))
    assert default_graph_seq_lens(192) == (192,) and default_graph_seq_lens(300) == (256, 300)
    assert T3EngineConfig(max_seq_len=1536, decode_attention="masked").seq_buckets == buckets


def test_padded_keys_attention_needs_one_kv_bucket_and_cuda():
    from serve_app.engine.t3.config import default_graph_seq_lens

    cfg = T3EngineConfig(max_seq_len=1536, decode_attention="padded_keys", device="cpu")
    assert cfg.seq_buckets == (1536,)  # rows read their own lengths: more buckets would only add graphs
    assert T3EngineConfig(max_seq_len=1536, decode_attention="padded_keys", graph_seq_lens=(512, 1536)).seq_buckets \
        == (512, 1536)
    with pytest.raises(ValueError, match="decode_attention"):
        T3EngineConfig(decode_attention="flash")
    assert T3EngineConfig(device="cuda").attention == "padded_keys"
    assert T3EngineConfig(device="cpu").attention == "masked"
    assert T3EngineConfig(device="cpu").seq_buckets == default_graph_seq_lens(1536)
    from serve_app.model.presets import build_t3, get_preset

    with pytest.raises(ValueError, match="CUDA only"):
        T3Engine(build_t3(get_preset("tiny")), cfg)


def test_capture_order_and_shared_pool(fake_cuda):
    seen = []
    g = DecodeGraphs(_recording(lambda n, L: seen.append((n, L))), _recording(lambda n: None), (1, 2, 4), (256, 512))
    g.capture()
    assert set(g.graphs) == {(n, L) for n in (1, 2, 4) for L in (256, 512)}
    assert fake_cuda == [None] + ["shared-pool"] * 5  # first capture makes the pool, the rest share it
    captured = [c[1] for gr in g.graphs.values() for c in gr.calls if len(c[1]) == 2]
    assert captured == sorted(captured, reverse=True)  # largest first
    seen.clear()
    g.run(2, 512)
    assert seen == [(2, 512)]


def _cond(seed):
    gen = torch.Generator().manual_seed(seed)
    return T3Conditioning(torch.randn(1, 256, generator=gen), torch.randint(0, 6561, (1, 150), generator=gen))


def _reqs():
    return [T3GenerationRequest("a", list(range(3, 20)), _cond(1), temperature=0.0, max_new_tokens=12),
            T3GenerationRequest("b", list(range(30, 40)), _cond(2), seed=4, max_new_tokens=9)]


def _tiny_t3():
    from serve_app.model.presets import build_t3, get_preset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return build_t3(get_preset("tiny")).eval()


def _fails_in_capture(fn, fails: bool):
    """`fn` recorded into fake graphs; raising, as an uncapturable op would, while capturing when `fails`."""
    recorded = _recording(fn)

    def wrapped(*args):
        if fails and _FakeGraph.current is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        recorded(*args)
    return wrapped


@pytest.mark.parametrize("sampler_fails", [False, True])
def test_engine_with_fake_graphs_matches_eager(fake_cuda, sampler_fails):
    t3 = _tiny_t3()
    cfg = T3EngineConfig(max_batch_requests=2, max_seq_len=256, dtype="fp32", device="cpu")
    eager = T3Engine(t3, cfg).generate(_reqs())

    engine = T3Engine(t3, cfg)
    sample = _fails_in_capture(engine._decode_sample, sampler_fails)
    engine.graphs = DecodeGraphs(_recording(engine._decode_forward), sample, cfg.batch_buckets, cfg.seq_buckets)
    engine.graphs.capture()
    assert engine.graphs.sampler_in_graph is (not sampler_fails)
    assert engine.generate(_reqs()) == eager


@pytest.mark.parametrize("capture_fails", [False, True])
def test_engine_with_fake_prefill_graphs_matches_eager(fake_cuda, capture_fails):
    """One-request prefills replay the graph of their length bucket (static rows, last positions, padding) and
    sample what eager prefill samples; a failed capture leaves prefill eager."""
    t3 = _tiny_t3()
    cfg = T3EngineConfig(max_batch_requests=2, max_seq_len=256, dtype="fp32", device="cpu", max_prefill_requests=1)
    eager = T3Engine(t3, cfg).generate(_reqs())

    engine = T3Engine(t3, cfg)
    forward = _fails_in_capture(engine._prefill_forward, capture_fails)
    engine.prefill_graphs = PrefillGraphs(forward, cfg.prefill_buckets)
    engine.prefill_graphs.capture()
    replayed = []
    run = engine.prefill_graphs.run
    engine.prefill_graphs.run = lambda n: (replayed.append(n), run(n))
    assert engine.generate(_reqs()) == eager
    if capture_fails:
        assert engine.prefill_graphs.graphs == {} and replayed == []
    else:
        assert set(engine.prefill_graphs.graphs) == set(cfg.prefill_buckets)
        # prompt = 38 positions + text tokens: 17 -> 55 (bucket 64), 10 -> 48 (bucket 64)
        assert replayed == [64, 64]


def test_prefill_buckets_pad_prompts():
    cfg = T3EngineConfig(max_batch_requests=2, max_seq_len=256, dtype="fp32", device="cpu")
    assert cfg.prefill_buckets == (64, 96, 128, 160, 192, 224, 256)
    assert T3EngineConfig(max_batch_requests=2, max_seq_len=256, device="cpu", prefill_graph_lens=()).prefill_buckets == ()


def test_decode_attention_index_tensors():
    """What a decode step feeds either attention, built on the device without a host read (CPU here)."""
    from serve_app.engine.t3.llama import decode_mask, padded_keys_lengths

    pos = torch.tensor([0, 3, 5])
    mask = decode_mask(pos, 6, torch.float32)
    assert mask.shape == (3, 1, 1, 6)
    assert [(mask[r, 0, 0] == 0).sum().item() for r in range(3)] == [1, 4, 6]   # keys 0..pos[r] visible
    assert torch.isinf(mask[0, 0, 0, 1:]).all() and mask[1, 0, 0, 4].item() == float("-inf")
    seqlen, starts, key_starts = padded_keys_lengths(pos, 16 * 256)
    assert seqlen.tolist() == [1, 4, 6] and starts.tolist() == [0, 1, 2, 3]
    assert key_starts.tolist() == [0, 4096, 8192, 12288] and {t.dtype for t in (seqlen, starts, key_starts)} == {torch.int32}
