"""T3Engine on CUDA: decode in CUDA graphs gives exactly the tokens of eager decode (same buckets, same kernels),
for bf16, bnb nf4 and bnb int8 (threshold 0); fp32 graphs match upstream T3.inference greedily.
Skipped without CUDA."""
import copy

import pytest
import torch

from serve_app.engine.t3 import T3Conditioning, T3Engine, T3EngineConfig, T3GenerationRequest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_cpu():
    from serve_app.model.presets import build_t3, get_preset

    torch.manual_seed(0)
    return build_t3(get_preset("tiny")).eval()


def _cond(seed):
    g = torch.Generator().manual_seed(seed)
    return T3Conditioning(speaker_emb=torch.randn(1, 256, generator=g),
                          cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g))


def _reqs(n_tokens=40):
    return [
        T3GenerationRequest("greedy", list(range(5, 60)), _cond(1), temperature=0.0, max_new_tokens=n_tokens),
        T3GenerationRequest("sampled", list(range(40, 50)), _cond(2), seed=3, top_p=0.9, max_new_tokens=n_tokens),
        T3GenerationRequest("hot", list(range(100, 130)), _cond(3), temperature=1.3, cfg_weight=1.0,
                            repetition_penalty=1.6, exaggeration=0.8, seed=9, max_new_tokens=n_tokens // 2),
        T3GenerationRequest("late", list(range(7, 17)), _cond(4), seed=1, max_new_tokens=n_tokens),
    ]


def _run_staggered(engine, reqs):
    """Admit the first request, decode a few steps, then the rest (so rows sit at different positions)."""
    got = {r.request_id: [] for r in reqs}
    engine.add_request(reqs[0])
    for _ in range(5):
        for o in engine.step():
            got[o.request_id] += o.new_tokens
    for r in reqs[1:]:
        engine.add_request(r)
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_tokens
    return got


def _engine(t3_cpu, enforce_eager, dtype="bf16", quant=None, slots=8, decode_attention="masked", compile=False):
    cfg = T3EngineConfig(max_batch_requests=slots, max_seq_len=384, dtype=dtype, quant=quant,
                         enforce_eager=enforce_eager, device="cuda", decode_attention=decode_attention,
                         compile=compile)
    return T3Engine(copy.deepcopy(t3_cpu), cfg)


def _quant_specs():
    try:
        from quant.spec import QuantSpec
    except ImportError:
        return []
    return [QuantSpec(method="nf4", dtype="bf16"), QuantSpec(method="int8", dtype="bf16", int8_threshold=0.0)]


@pytest.mark.parametrize("quant", [None, *_quant_specs()], ids=lambda q: "bf16" if q is None else q.label())
def test_graph_equals_eager(tiny_cpu, quant):
    eager = _run_staggered(_engine(tiny_cpu, True, quant=quant), _reqs())
    graphed_engine = _engine(tiny_cpu, False, quant=quant)
    assert graphed_engine.graphs is not None and graphed_engine.graphs.graphs
    graphed = _run_staggered(graphed_engine, _reqs())
    assert graphed == eager
    assert all(len(v) > 0 for v in graphed.values())


def test_batched_equals_alone_in_graphs(tiny_cpu):
    # fp32 without TF32: bf16 GEMMs of different batch sizes may round differently (not batch-invariant)
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = _engine(tiny_cpu, False, dtype="fp32")
    together = _run_staggered(engine, _reqs())
    for r in _reqs():
        assert engine.generate([r])[r.request_id] == together[r.request_id], r.request_id


def test_fp32_graphs_match_upstream_greedy(tiny_cpu):
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    torch.backends.cuda.matmul.allow_tf32 = False
    text, cond, n = list(range(3, 40)), _cond(5), 48
    up_t3 = copy.deepcopy(tiny_cpu).cuda()
    t3_cond = T3Cond(speaker_emb=cond.speaker_emb.cuda(), cond_prompt_speech_tokens=cond.cond_prompt_speech_tokens.cuda(),
                     emotion_adv=0.5 * torch.ones(1, 1, 1, device="cuda"))
    up = up_t3.inference(t3_cond=t3_cond, text_tokens=torch.tensor([[255, *text, 0]] * 2, device="cuda"),
                         max_new_tokens=n, temperature=1e-4, top_p=1.0)[0].tolist()
    engine = _engine(tiny_cpu, False, dtype="fp32", slots=2)
    got = engine.generate([T3GenerationRequest("a", text, cond, temperature=0.0, max_new_tokens=n)])["a"]
    assert got == [t for t in up if t < 6561]


def test_full_preset_bf16_graph_equals_eager():
    from serve_app.model.presets import build_t3, get_preset

    torch.manual_seed(0)
    full = build_t3(get_preset("full")).eval()
    reqs = _reqs(n_tokens=24)
    eager = _run_staggered(_engine(full, True, slots=4), reqs)
    graphed = _run_staggered(_engine(full, False, slots=4), _reqs(n_tokens=24))
    assert graphed == eager


def test_int8_outlier_threshold_refuses_graphs(tiny_cpu):
    specs = _quant_specs()
    if not specs:
        pytest.skip("quant package not available")
    from quant.spec import QuantSpec

    with pytest.raises(ValueError, match="enforce_eager"):
        _engine(tiny_cpu, False, quant=QuantSpec(method="int8", dtype="bf16", int8_threshold=6.0))


@pytest.mark.parametrize("decode_attention", ["masked", "padded_keys"])
def test_decode_step_has_no_host_sync(tiny_cpu, decode_attention):
    """The eager decode step (what the graphs capture) must not synchronize with the host."""
    engine = _engine(tiny_cpu, True, decode_attention=decode_attention)
    for r in _reqs():
        engine.add_request(r)
    engine.step()  # prefill + first decode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():  # as engine.step runs it
            engine._decode(4, engine.config.seq_buckets[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_keys_attention_matches_masked_sdpa_and_reads_only_each_rows_keys(dtype):
    from serve_app.engine.t3.llama import padded_keys_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, H, S, D, R, L = 12, 4, 256, 64, 10, 192  # R decode rows of a 12-row cache, bucket L
    k_cache = torch.randn(rows, H, S, D, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn(rows, H, S, D, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(R, H, 1, D, device="cuda", dtype=dtype, generator=g)
    pos = torch.tensor([0, 1, 63, 64, 65, 100, 127, 128, 150, 191], device="cuda")  # [R]
    mask = torch.zeros(R, 1, 1, L, device="cuda", dtype=dtype)
    mask.masked_fill_(~(torch.arange(L, device="cuda")[None, :] <= pos[:, None])[:, None, None, :], float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(  # math, in fp32
        q.float(), k_cache[:R, :, :L].float(), v_cache[:R, :, :L].float(), attn_mask=mask.float())
    ref = ref.transpose(1, 2).reshape(R, 1, H * D)
    starts = torch.arange(R + 1, dtype=torch.int32, device="cuda")
    seqlen = (pos + 1).to(torch.int32)

    def run():
        return padded_keys_attention(q, k_cache, v_cache, seqlen, starts, starts * H * S, L).float()

    got = run()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    # keys past a row's length (and other rows' keys) are never read: garbage there changes nothing
    for r in range(R):
        k_cache[r, :, int(pos[r]) + 1:] = float("nan")
        v_cache[r, :, int(pos[r]) + 1:] = float("nan")
    k_cache[R:] = float("nan")
    v_cache[R:] = float("nan")
    assert torch.equal(run(), got)


def test_padded_keys_engine_graph_equals_eager_and_masked_greedy(tiny_cpu):
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = _run_staggered(_engine(tiny_cpu, True, dtype="fp32", decode_attention="padded_keys"), _reqs())
    engine = _engine(tiny_cpu, False, dtype="fp32", decode_attention="padded_keys")
    assert set(k[1] for k in engine.graphs.graphs) == {384}  # one KV bucket: rows read their own lengths
    graphed = _run_staggered(engine, _reqs())
    assert graphed == eager
    masked_engine = _engine(tiny_cpu, False, dtype="fp32")
    masked = _run_staggered(masked_engine, _reqs())
    assert graphed["greedy"] == masked["greedy"]  # fp32 greedy: the same tokens through either kernel
    assert engine.stats.kv_positions_used == masked_engine.stats.kv_positions_used
    assert engine.stats.kv_positions_read < masked_engine.stats.kv_positions_read


@pytest.mark.parametrize("decode_attention", ["masked", "padded_keys"])
def test_compiled_decode_in_graphs_gives_the_uncompiled_tokens(tiny_cpu, decode_attention):
    """torch.compile'd decode backbone, captured in the decode graphs: the uncompiled engine's fp32 tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    plain = _run_staggered(_engine(tiny_cpu, False, dtype="fp32", decode_attention=decode_attention), _reqs())
    compiled = _run_staggered(_engine(tiny_cpu, False, dtype="fp32", decode_attention=decode_attention,
                                      compile=True), _reqs())
    assert compiled == plain
