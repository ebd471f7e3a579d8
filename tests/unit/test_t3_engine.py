"""T3Engine on CPU with random weights: matches upstream T3.inference, batching does not change results,
slots are reused, cancel and caps work. fp32, tiny preset (one full-size check)."""
import pytest
import torch

from serve_app.engine.t3 import T3Conditioning, T3Engine, T3EngineConfig, T3GenerationRequest

STOP = 6562


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two contended cores: intra-op threads only add contention for these small matmuls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build(preset="tiny", seed=0):
    from serve_app.model.presets import build_t3, get_preset

    torch.manual_seed(seed)
    return build_t3(get_preset(preset)).eval()


@pytest.fixture(scope="module")
def t3():
    return _build()


def _cond(seed):
    g = torch.Generator().manual_seed(seed)
    return T3Conditioning(speaker_emb=torch.randn(1, 256, generator=g),
                          cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g))


def _engine(t3, slots=4, **kw):
    return T3Engine(t3, T3EngineConfig(max_batch_requests=slots, max_seq_len=256, dtype="fp32", device="cpu",
                                       max_prefill_requests=kw.pop("max_prefill_requests", 4), **kw))


def _upstream(t3, text, cond, n, exaggeration=0.5, cfg_weight=0.5):
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    t3_cond = T3Cond(speaker_emb=cond.speaker_emb, cond_prompt_speech_tokens=cond.cond_prompt_speech_tokens,
                     emotion_adv=exaggeration * torch.ones(1, 1, 1))
    tt = torch.tensor([[255, *text, 0]] * 2)
    # temperature 1e-4 makes upstream's multinomial pick the argmax: greedy
    out = t3.inference(t3_cond=t3_cond, text_tokens=tt, max_new_tokens=n, temperature=1e-4, top_p=1.0,
                       cfg_weight=cfg_weight)
    return out[0].tolist()


class _HeadRecorder:
    """Records the last-position output rows of t3.speech_head (called by upstream and by the eager engine)."""

    def __init__(self, head):
        self.rows = []
        self.handle = head.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.rows.append((out[:, -1] if out.dim() == 3 else out).detach().clone())  # [2, V] or [2n, V]

    def close(self):
        self.handle.remove()


def test_greedy_matches_upstream_tokens_and_logits(t3):
    text, cond, n = list(range(3, 42)), _cond(1), 64
    rec = _HeadRecorder(t3.speech_head)
    up_raw = _upstream(t3, text, cond, n, exaggeration=0.7, cfg_weight=0.6)
    up_logits, rec.rows = rec.rows, []
    eng = _engine(t3, slots=1)
    eng.add_request(T3GenerationRequest("a", text, cond, temperature=0.0, cfg_weight=0.6, exaggeration=0.7,
                                        max_new_tokens=n))
    seq = eng.scheduler.get("a")
    out = []
    while eng.has_unfinished():
        for o in eng.step():
            out += o.new_tokens
            finish = o.finish_reason
    rec.close()
    assert out == [t for t in up_raw if t < 6561]
    assert seq.token_ids == up_raw and finish == "length" and seq.num_generated == n
    # every step's cond/uncond logits: prefill + n-1 decodes (upstream also runs one unused forward at the end)
    assert len(rec.rows) == n and len(up_logits) == n + 1
    max_err = max((a - b).abs().max().item() for a, b in zip(up_logits, rec.rows))
    assert max_err < 2e-5, max_err  # measured ~1e-6 on logits of magnitude ~3 (fp32)


_ALONE: dict = {}


def _alone(t3, req):
    """Tokens of `req` decoded alone (cached per module weights and request: the tests reuse a few requests)."""
    key = (id(t3), req.request_id, req.seed, req.temperature, req.top_p, req.max_new_tokens)
    if key not in _ALONE:
        _ALONE[key] = _engine(t3, slots=4).generate([req])[req.request_id]
    return _ALONE[key]


def _reqs():
    c1, c2 = _cond(2), _cond(3)
    return [
        T3GenerationRequest("greedy", list(range(5, 30)), c1, temperature=0.0, max_new_tokens=24),
        T3GenerationRequest("sampled", list(range(40, 50)), c2, temperature=0.8, top_p=0.9, seed=11,
                            max_new_tokens=30),
        T3GenerationRequest("hot", list(range(100, 160)), c1, temperature=1.2, min_p=0.1, repetition_penalty=1.5,
                            cfg_weight=1.0, exaggeration=0.9, seed=5, max_new_tokens=18),
    ]


def test_batched_equals_alone_with_staggered_admission(t3):
    reqs = _reqs()
    alone = {r.request_id: _alone(t3, r) for r in reqs}
    eng = _engine(t3, slots=4, max_prefill_requests=1)
    got = {r.request_id: [] for r in reqs}
    eng.add_request(reqs[0])
    for o in eng.step() + eng.step():
        got[o.request_id] += o.new_tokens
    eng.add_request(reqs[1])
    eng.add_request(reqs[2])
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_tokens
            assert all(t < 6561 for t in o.new_tokens)
    assert got == alone
    assert all(len(v) > 0 for v in got.values())


def test_seed_reproducible_and_seeds_differ(t3):
    base = _reqs()[1]
    a = _alone(t3, base)
    b = _alone(t3, T3GenerationRequest("sampled", base.text_tokens, base.cond, top_p=0.9, seed=12,
                                       max_new_tokens=30))
    assert a == _engine(t3, slots=4).generate([base])["sampled"] and a != b


def test_slots_are_reused_and_results_unchanged(t3):
    reqs = _reqs() + [T3GenerationRequest(f"extra{i}", list(range(7 + i, 20)), _cond(10 + i), seed=i,
                                          max_new_tokens=6 + 3 * i) for i in range(3)]
    eng = _engine(t3, slots=2)
    got = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r)
    slots_seen = set()
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_tokens
        assert len(eng.scheduler.running) <= 2
        slots_seen |= set(eng.scheduler.running)
    assert slots_seen == {0, 1}
    assert eng.scheduler.allocator.num_free == 2
    for r in reqs[:3]:
        assert got[r.request_id] == _alone(t3, r), r.request_id


def test_cancel_frees_slot_at_next_step(t3):
    r1, r2 = _reqs()[:2]
    eng = _engine(t3, slots=1)
    eng.add_request(r1)
    eng.add_request(r2)
    assert {o.request_id for o in eng.step()} == {"greedy"}
    eng.cancel("greedy")
    assert eng.scheduler.running[0].request_id == "greedy"  # freed at the next step, not before
    outs = {o.request_id: o for o in eng.step()}
    assert outs["greedy"].finished and outs["greedy"].finish_reason == "cancelled"
    assert outs["greedy"].new_tokens == []
    assert eng.scheduler.running[0].request_id == "sampled"  # took the freed slot in the same step
    rest = outs["sampled"].new_tokens
    while eng.has_unfinished():
        rest += [t for o in eng.step() for t in o.new_tokens]
    assert rest == _alone(t3, r2)
    eng.cancel("unknown")  # harmless


def test_stop_token_ends_request_and_is_not_returned():
    t3 = _build(seed=3)
    eng = _engine(t3, slots=2)
    eng.add_request(T3GenerationRequest("s", list(range(3, 20)), _cond(4), temperature=0.0, max_new_tokens=50))
    seq = eng.scheduler.get("s")
    got = [t for _ in range(3) for o in eng.step() for t in o.new_tokens]
    assert len(seq.token_ids) == 4  # prefill + decode in the admission step, then one per step
    with torch.no_grad():  # make the stop token win from now on (eager mode reads live weights)
        t3.speech_head.bias = torch.nn.Parameter(torch.zeros(t3.speech_head.out_features))
        t3.speech_head.bias[STOP] = 1e4
    (o,) = eng.step()
    assert o.finished and o.finish_reason == "stop" and STOP not in o.new_tokens
    assert seq.token_ids[-1] == STOP and len(seq.token_ids) == 5
    assert got + o.new_tokens == [t for t in seq.token_ids if t < 6561]
    assert not eng.has_unfinished() and eng.scheduler.allocator.num_free == 2


def test_request_validation(t3):
    eng = _engine(t3, slots=1)
    cond = _cond(0)
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add_request(T3GenerationRequest("long", list(range(300)), cond))
    with pytest.raises(ValueError, match="top_p"):
        eng.add_request(T3GenerationRequest("p", [1, 2], cond, top_p=1.5))
    eng.add_request(T3GenerationRequest("dup", [1, 2], cond, max_new_tokens=500))
    assert eng.scheduler.get("dup").max_new_tokens == 256 - (34 + 2 + 2 + 2) + 1  # capped to fit the cache
    with pytest.raises(ValueError, match="already"):
        eng.add_request(T3GenerationRequest("dup", [1, 2], cond))


def test_int8_with_outlier_threshold_refuses_graphs():
    from serve_app.engine.t3.config import graphs_unsupported_reason

    class Spec:
        method, int8_threshold = "int8", 6.0

    assert "enforce_eager" in graphs_unsupported_reason(Spec())
    Spec.int8_threshold = 0.0
    assert graphs_unsupported_reason(Spec()) is None


@pytest.mark.slow
def test_full_architecture_matches_upstream_few_steps():
    t3 = _build("full")
    text, cond, n = list(range(3, 30)), _cond(7), 4
    up = _upstream(t3, text, cond, n)
    eng = T3Engine(t3, T3EngineConfig(max_batch_requests=1, max_seq_len=128, dtype="fp32", device="cpu"))
    eng.add_request(T3GenerationRequest("a", text, cond, temperature=0.0, max_new_tokens=n))
    seq = eng.scheduler.get("a")
    while eng.has_unfinished():
        eng.step()
    assert seq.token_ids == up


def test_a_voices_conditioning_embeddings_are_computed_once_per_exaggeration(t3, monkeypatch):
    """The engine caches the voice's conditioning (perceiver and all) on its T3Conditioning; what it samples is
    what a fresh conditioning object gives."""
    from serve_app.engine.t3 import engine as engine_mod

    calls = []
    real = engine_mod.cond_embeds
    monkeypatch.setattr(engine_mod, "cond_embeds", lambda *a: (calls.append(a[2]), real(*a))[1])
    cond = _cond(3)

    def req(rid, c, exaggeration=0.5):
        return T3GenerationRequest(rid, list(range(3, 20)), c, temperature=0.0, max_new_tokens=6,
                                   exaggeration=exaggeration)

    eng = _engine(t3)
    cached = eng.generate([req("a", cond)])["a"]
    again = eng.generate([req("b", cond)])["b"]
    other = eng.generate([req("c", cond, exaggeration=0.9)])["c"]
    assert calls == [0.5, 0.9]                                     # one per exaggeration, not per request
    fresh = _engine(t3).generate([req("d", _cond(3)), req("e", _cond(3), 0.9)])
    assert cached == again == fresh["d"] and other == fresh["e"]
    assert len(cond.embeds) == 2


def test_stats_count_the_kv_attention_reads_and_what_requests_held(t3):
    """Each decode step reads cache rows x its KV bucket (what `_decode` ran with); a request holds two rows of its
    own length, one position longer each step."""
    eng = _engine(t3, slots=4)
    ran = []
    decode = eng._decode
    eng._decode = lambda nb, kv_len: (ran.append((nb, kv_len)), decode(nb, kv_len))[1]
    eng.add_request(T3GenerationRequest("a", list(range(5, 30)), _cond(1), temperature=0.0, max_new_tokens=12))
    used = []
    while eng.has_unfinished():
        eng.step()
        used.append(eng.stats.kv_positions_used)
    st = eng.stats
    assert st.num_decode_steps == len(ran) >= 10
    assert st.kv_positions_read == sum(2 * nb * kv for nb, kv in ran)
    assert all(kv == 256 for _, kv in ran)                 # a short request stays in the smallest bucket
    steps = [b - a for a, b in zip(used, used[1:]) if b > a]
    assert all(b - a == 2 for a, b in zip(steps, steps[1:]))   # two rows, one position longer each step
    assert 1 < st.kv_read_ratio < 256 / 25                   # read the 256 bucket; held >= the 25-token text


def test_a_first_chunk_is_admitted_before_waiting_later_ones(t3):
    """With every slot taken, a priority-0 request that arrives last is prefilled first when a slot frees."""
    eng = _engine(t3, slots=1)
    eng.add_request(T3GenerationRequest("running", list(range(5, 20)), _cond(1), max_new_tokens=3))
    eng.step()                                            # takes the one slot
    admitted = [s.request_id for s in eng.scheduler.running.values()]
    eng.add_request(T3GenerationRequest("later-chunk", list(range(5, 20)), _cond(2), max_new_tokens=3, priority=1))
    eng.add_request(T3GenerationRequest("first-chunk", list(range(5, 20)), _cond(3), max_new_tokens=3))
    while eng.has_unfinished():
        eng.step()
        admitted += [s.request_id for s in eng.scheduler.running.values() if s.request_id not in admitted]
    assert admitted == ["running", "first-chunk", "later-chunk"]


def test_compiled_decode_gives_the_eager_engines_logits_and_tokens(t3):
    """`compile=True` runs the decode step's backbone through torch.compile (Inductor; C++ on CPU): the same
    logits to float tolerance and the same greedy and seeded tokens, with requests admitted at different steps."""
    import copy

    def run(compile_):
        eng = _engine(copy.deepcopy(t3), slots=4, max_prefill_requests=1, compile=compile_)
        rec = _HeadRecorder(eng.t3.speech_head)
        reqs = _reqs()
        got = {r.request_id: [] for r in reqs}
        eng.add_request(reqs[0])
        for o in eng.step() + eng.step():
            got[o.request_id] += o.new_tokens
        for r in reqs[1:]:
            eng.add_request(r)
        while eng.has_unfinished():
            for o in eng.step():
                got[o.request_id] += o.new_tokens
        rec.close()
        return got, rec.rows

    from torch._dynamo.utils import counters

    eager_tokens, eager_rows = run(False)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled_tokens, compiled_rows = run(True)
    assert counters["stats"]["unique_graphs"] > graphs_before       # Dynamo did trace the decode step
    assert compiled_tokens == eager_tokens and all(eager_tokens.values())
    assert len(compiled_rows) == len(eager_rows)
    for a, b in zip(compiled_rows, eager_rows):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
