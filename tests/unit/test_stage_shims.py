"""Stage shims built unstarted (plain classes, fake backends and handles): batching, caching, voices on disk."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve_app.serving.stages.conds_cache import CondsCache
from serve_app.serving.config import S3GenSettings, T3Settings, VoiceSettings
from serve_app.contracts import BUILTIN_VOICE, SpeechJob, SynthesisParams, T3Job, TokenChunk, VoiceConds
from serve_app.serving.errors import InvalidRequestError, VoiceNotFoundError
from router_fakes import FakeMetrics


def _conds(seed: int = 0) -> VoiceConds:
    rng = np.random.default_rng(seed)
    return VoiceConds(
        t3_speaker_emb=rng.standard_normal((1, 256)).astype(np.float32),
        t3_cond_prompt_speech_tokens=rng.integers(0, 6561, (1, 150)).astype(np.int64), t3_emotion_adv=0.5,
        gen_prompt_token=rng.integers(0, 6561, (1, 20)).astype(np.int64), gen_prompt_token_len=np.array([20]),
        gen_prompt_feat=rng.standard_normal((1, 40, 80)).astype(np.float32),
        gen_embedding=rng.standard_normal((1, 192)).astype(np.float32))


class FakeVoiceMethod:
    def __init__(self, owner):
        self.owner = owner

    async def remote(self, voice_id):
        self.owner.calls += 1
        if voice_id not in ("default", "v1"):
            raise VoiceNotFoundError(f"Voice {voice_id!r} not found.")
        return _conds()


class FakeVoiceHandle:
    def __init__(self):
        self.calls = 0
        self.get_conds = FakeVoiceMethod(self)


class FakeT3Backend:
    name = "fake"

    def prepare_conds(self, conds):
        return ("prepared", conds.t3_emotion_adv)

    def num_unfinished(self):
        return 0

    async def generate(self, job, conds, started=None):
        assert conds[0] == "prepared"
        yield TokenChunk(job.request_id, [1, 2, 3])
        yield TokenChunk(job.request_id, [4], finished=True, finish_reason="length")

    def close(self):
        pass


class FakeS3GenBackend:
    """960 zeros per new usable token; records the token counts of every engine step."""

    name = "fake"

    def __init__(self):
        self.steps = []

    def prepare_conds(self, conds):
        return "ref"

    def new_stream_state(self):
        return {"n": 0}

    def vocode_batch(self, items):
        self.steps.append([(it.request_id, len(it.tokens), it.finalize) for it in items])
        out = []
        for it in items:
            usable = len(it.tokens) - (0 if it.finalize else 3)
            done = 0 if it.state is None else it.state["n"]
            out.append((np.zeros((usable - done) * 960, np.float32), None if it.state is None else {"n": usable}))
        return out


class BlockT3:
    """A T3 handle (plain object) that streams `total` tokens in blocks of `step`, `delay_s` apart."""

    def __init__(self, total=60, step=4, delay_s=0.002):
        self.total, self.step, self.delay_s = total, step, delay_s
        self.jobs, self.cancelled = [], []

    async def generate(self, job):
        self.jobs.append(job)
        try:
            for start in range(0, self.total, self.step):
                await asyncio.sleep(self.delay_s)
                yield TokenChunk(job.request_id, list(range(start, min(self.total, start + self.step))))
            yield TokenChunk(job.request_id, [], finished=True, finish_reason="length")
        except asyncio.CancelledError:
            self.cancelled.append(job.request_id)
            raise


def test_t3_replica_streams_and_caches_conds():
    from serve_app.serving.stages.t3_stage import T3Replica

    voice = FakeVoiceHandle()
    replica = T3Replica(None, voice, T3Settings(), backend=FakeT3Backend())

    async def run():
        out = []
        for i in range(3):
            out.append([c async for c in replica.generate(T3Job(f"r{i}", "Hi.", "default"))])
        return out

    results = asyncio.run(run())
    assert [sum(len(c.tokens) for c in r) for r in results] == [4, 4, 4]
    assert results[0][-1].finished and results[0][-1].finish_reason == "length"
    assert voice.calls == 1   # conds fetched once, then cached
    assert replica.memory_report()["device"] == "cpu"


def test_s3gen_replica_streams_chunks_batched_and_cancels_t3():
    from serve_app.serving.stages.s3gen_stage import S3GenReplica

    backend, t3 = FakeS3GenBackend(), BlockT3()
    replica = S3GenReplica(None, FakeVoiceHandle(), S3GenSettings(), backend=backend, t3_handle=t3)
    replica._metrics = metrics = FakeMetrics()

    async def collect(job):
        return [b async for b in replica.synthesize(job)]

    async def run():
        jobs = [SpeechJob(f"s{i}", "Hi.", "default", SynthesisParams(), streaming=True, first_step_tokens=10,
                          step_tokens=10) for i in range(4)]
        jobs.append(SpeechJob("once", "Hi.", "default", SynthesisParams(), streaming=False))
        results = await asyncio.gather(*(collect(j) for j in jobs))
        # a consumer that leaves after the first block cancels its T3 stream and frees the stream's state
        gen = replica.synthesize(SpeechJob("gone", "Hi.", "default", first_step_tokens=10, step_tokens=10))
        await gen.__anext__()
        await gen.aclose()
        return results

    results = asyncio.run(run())
    for blocks in results:
        assert blocks[-1].finished and blocks[-1].finish_reason == "length"
        assert sum(b.audio.size for b in blocks) == 60 * 960 and sum(b.num_speech_tokens for b in blocks) == 60
    assert all(len(blocks) >= 3 for blocks in results[:4]) and len(results[4]) == 1
    assert max(len(step) for step in backend.steps) >= 3          # streams of different chunks share steps
    assert t3.jobs[0].first_block_tokens == 13 and t3.jobs[0].block_tokens == 16
    assert t3.cancelled == ["gone"] and len(replica.scheduler) == 0 and not replica._outputs
    # every text chunk is counted once by how T3 ended it; the one whose consumer left, as incomplete
    finishes = [t["finish"] for _, t in metrics.values("s3gen_chunks_total")]
    assert sorted(finishes) == ["incomplete"] + ["length"] * 5
    # every step fed the step-time estimate that deadline_steps (switched on by user_config) reads
    assert replica.scheduler.seconds_per_flow_token is not None
    # and T3's blocks fed the pace that first_step_cover reads
    assert replica.scheduler.t3_seconds_per_token is not None and replica.scheduler.step_seconds is not None
    replica.reconfigure({"max_batch_tokens": 200, "deadline_steps": True, "urgent_steps": 3.0})
    assert replica.memory_report()["max_batch_tokens"] == 200 and replica.scheduler.policy.deadline_steps
    assert replica.scheduler.policy.urgent_steps == 3.0


def test_an_idle_s3gen_replica_asks_t3_for_a_short_first_block():
    """light_first_step_tokens: the first stream on an idle replica gets the short first step (and T3 a first block
    of that plus the flow's look-ahead); one that arrives while another is open gets the router's size."""
    from serve_app.serving.stages.s3gen_stage import S3GenReplica

    settings = S3GenSettings(user_config={"light_first_step_tokens": 4})
    t3 = BlockT3(total=40, step=4, delay_s=0.01)
    replica = S3GenReplica(None, FakeVoiceHandle(), settings, backend=FakeS3GenBackend(), t3_handle=t3)

    async def run():
        first = replica.synthesize(SpeechJob("a", "Hi.", "default", first_step_tokens=10, step_tokens=10))
        block = await first.__anext__()
        second = [b async for b in replica.synthesize(SpeechJob("b", "Hi.", "default", first_step_tokens=10,
                                                                step_tokens=10))]
        await first.aclose()
        return block, second

    block, second = asyncio.run(run())
    assert 4 <= block.num_speech_tokens < 10 and t3.jobs[0].first_block_tokens == 4 + 3
    assert t3.jobs[1].first_block_tokens == 10 + 3 and second[0].num_speech_tokens >= 10


def test_a_second_cancellation_still_frees_the_s3gen_stream_and_its_t3_call():
    from serve_app.serving.stages.s3gen_stage import S3GenReplica

    t3 = BlockT3(total=10_000, delay_s=0.005)
    replica = S3GenReplica(None, FakeVoiceHandle(), S3GenSettings(), backend=FakeS3GenBackend(), t3_handle=t3)

    async def run():
        async def consume():
            async for _ in replica.synthesize(SpeechJob("twice", "Hi.", "default", first_step_tokens=10)):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0)        # inside the cleanup now
        task.cancel()                 # a second cancellation (Ray may cancel again)
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert len(replica.scheduler) == 0 and not replica._outputs
    assert t3.cancelled == ["twice"]


def test_conds_cache_is_bounded_lru_and_shares_misses():
    fetched = []

    async def fetch(voice_id):
        fetched.append(voice_id)
        await asyncio.sleep(0.01)
        return voice_id

    async def run():
        cache = CondsCache(fetch, str.upper, max_entries=2)
        assert await asyncio.gather(cache.get("a"), cache.get("a")) == ["A", "A"]
        await cache.get("b")
        await cache.get("c")   # evicts a
        await cache.get("a")
        return cache

    cache = asyncio.run(run())
    assert fetched == ["a", "b", "c", "a"] and len(cache) == 2


def test_voice_store_roundtrip(tmp_path):
    from serve_app.serving.stages.voice_store import VoiceStore, voice_conds_to_conditionals

    builtin = _conds(1)
    store = VoiceStore(tmp_path / "voices", builtin)
    info = store.add(_conds(2), "mine", 3.25)
    other = store.add(voice_conds_to_conditionals(_conds(3)), None, 1.0)   # upstream Conditionals work too
    assert other.name == other.voice_id and other.voice_id.startswith("voice_")
    assert (tmp_path / "voices" / info.voice_id / "conds.pt").exists()
    assert [v.voice_id for v in store.list()][0] == BUILTIN_VOICE
    assert {v.voice_id for v in store.list()} == {BUILTIN_VOICE, info.voice_id, other.voice_id}
    loaded = store.load(info.voice_id)
    np.testing.assert_array_equal(loaded.gen_prompt_feat, _conds(2).gen_prompt_feat)
    assert loaded.t3_cond_prompt_speech_tokens.dtype == np.int64
    assert store.load(BUILTIN_VOICE) is builtin

    # upstream can read what we wrote
    from chatterbox.tts import Conditionals

    upstream = Conditionals.load(tmp_path / "voices" / info.voice_id / "conds.pt")
    assert tuple(upstream.t3.speaker_emb.shape) == (1, 256)

    with pytest.raises(InvalidRequestError):
        store.delete(BUILTIN_VOICE)
    store.delete(info.voice_id)
    assert not store.exists(info.voice_id)
    with pytest.raises(VoiceNotFoundError, match="list voices with GET /v1/voices"):   # the route that exists
        store.load(info.voice_id)
    with pytest.raises(VoiceNotFoundError):
        store.load("../etc")


def test_voice_replica_rejects_short_clip(tmp_path):
    from serve_app.serving.stages.voice_stage import VoiceReplica

    class NoEnroll:
        name = "fake"

        def enroll(self, wav, sr, exaggeration=0.5):
            raise AssertionError("not reached")

    replica = VoiceReplica(None, VoiceSettings(voices_dir=tmp_path), enroller=NoEnroll(), builtin=_conds())
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(1600, "<i2").tobytes())
    with pytest.raises(InvalidRequestError, match="at least"):
        asyncio.run(replica.enroll(buf.getvalue(), "short"))
    assert [v.voice_id for v in asyncio.run(replica.list_voices())] == [BUILTIN_VOICE]


class FakeEngine:
    """T3Engine's contract: add_request / cancel / has_unfinished / step, two tokens per request per step."""

    def __init__(self, steps_per_request: int = 3):
        self.active: dict[str, int] = {}
        self.cancelled: list[str] = []
        self.steps_per_request = steps_per_request

    def add_request(self, req):
        self.active[req.request_id] = 0

    def cancel(self, request_id):
        if self.active.pop(request_id, None) is not None:
            self.cancelled.append(request_id)

    def has_unfinished(self):
        return bool(self.active)

    def step(self):
        from serve_app.engine.t3.request import T3StepOutput

        out = []
        for rid in list(self.active):
            self.active[rid] += 1
            done = self.active[rid] >= self.steps_per_request
            out.append(T3StepOutput(rid, [self.active[rid]] * 2, done, "length" if done else None))
            if done:
                del self.active[rid]
        return out


class FakeTokenizer:
    def text_to_tokens(self, text):
        import torch

        return torch.tensor([[5, 6, 7]])


def test_engine_t3_backend_streams_and_cancels():
    from serve_app.serving.stages.t3_backend import EngineT3Backend

    engine = FakeEngine()
    backend = EngineT3Backend(engine, FakeTokenizer())
    conds = backend.prepare_conds(_conds())

    async def run():
        async def one(i):
            return [c async for c in backend.generate(T3Job(f"r{i}", "Hi.", "default"), conds)]

        results = await asyncio.gather(*(one(i) for i in range(3)))
        gen = backend.generate(T3Job("cancel-me", "Hi.", "default"), conds)
        await gen.__anext__()
        await gen.aclose()
        for _ in range(50):
            if "cancel-me" in engine.cancelled or not engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        return results

    try:
        results = asyncio.run(run())
    finally:
        backend.close()
    for chunks in results:
        # in order; steps that arrived while the reader was busy come as one chunk
        assert [t for c in chunks for t in c.tokens] == [1, 1, 2, 2, 3, 3] and all(c.tokens for c in chunks)
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert backend.num_unfinished() == 0


def test_engine_t3_backend_hands_the_event_loop_whole_blocks(monkeypatch):
    """The step thread fills each request's blocks (first_block_tokens, then block_tokens) and wakes the event loop
    only with full ones (and the last); the first block carries T3's first-token and first-block times."""
    import time

    from serve_app.contracts import T3_FIRST_BLOCK_PHASES
    from serve_app.serving.stages import t3_backend
    from serve_app.serving.stages.t3_backend import EngineT3Backend

    handoffs = []
    put_all = t3_backend._put_all
    monkeypatch.setattr(t3_backend, "_put_all", lambda items: (handoffs.append(len(items)), put_all(items)))
    engine = FakeEngine(steps_per_request=6)     # 12 tokens, two a step
    backend = EngineT3Backend(engine, FakeTokenizer())
    conds = backend.prepare_conds(_conds())

    async def run():
        job = T3Job("r", "Hi.", "default", first_block_tokens=3, block_tokens=4)
        return [c async for c in backend.generate(job, conds, time.monotonic())]

    try:
        chunks = asyncio.run(run())
    finally:
        backend.close()
    assert [t for c in chunks for t in c.tokens] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert handoffs == [1, 1, 1]                 # blocks of 4, 4 and the last 4; not one per step (6)
    assert all(len(c.tokens) >= 3 for c in chunks)
    first = chunks[0].timings
    assert set(first) == set(T3_FIRST_BLOCK_PHASES) and all(v >= 0 for v in first.values())
    assert all(c.timings is None for c in chunks[1:])


def test_cpu_replicas_default_to_dynamic_int8_and_ignore_bnb(caplog):
    from serve_app.serving.stages.stage_common import resolve_quant

    for strategy in (None, "auto", "dynamic"):
        specs = resolve_quant(strategy, "cpu", "t3")
        assert specs["t3"].method == "dynamic_int8" and specs["s3gen_flow_decoder"].method == "dynamic_int8"
    assert resolve_quant("none", "cpu", "t3") == {}
    assert resolve_quant("mixed", "cpu", "t3") == {} and "ignored" in caplog.text   # a GPU config fell back
    assert resolve_quant(None, "cuda", "t3") == {}


def test_t3_blocks_carry_the_first_blocks_timings_once():
    # first token after 0.03 s (queue + prefill), 4 more steps of 0.01 s fill the first block of 5 tokens: the
    # first block says so; later blocks carry no timings
    from serve_app.contracts import T3_FIRST_BLOCK_PHASES
    from serve_app.serving.stages.t3_backend import TokenBlocks

    job = T3Job("r", "Hi.", "default", first_block_tokens=5, block_tokens=4)
    filling = TokenBlocks.of(job, started=0.0)
    blocks = [filling.add([i], False, None, 0.03 + 0.01 * i) for i in range(12)]
    blocks.append(filling.add([], True, "length", 0.03 + 0.01 * 12))
    blocks = [b for b in blocks if b is not None]
    assert [len(b.tokens) for b in blocks] == [5, 4, 3] and blocks[-1].finished
    first = blocks[0].timings
    assert set(first) == set(T3_FIRST_BLOCK_PHASES)
    assert 0.03 <= first["t3_first_token"] < 0.03 + 0.03
    assert 0.04 <= first["t3_first_block"] < 0.04 + 0.04
    assert all(b.timings is None for b in blocks[1:])


def test_engine_totals_become_counter_increments():
    """Both stages export their engines' running totals through EngineTotals: each export adds what grew."""
    from serve_app.serving.stages.stage_common import EngineTotals

    class Counter:
        def __init__(self):
            self.incs = []

        def inc(self, value, tags):
            assert value > 0 and tags == {"backend": "engine"}   # Ray's Counter refuses 0
            self.incs.append(value)

    a, b = Counter(), Counter()
    totals = EngineTotals({"backend": "engine"})
    for read, used in ((10, 4), (10, 4), (25, None), (40, 9)):
        totals.export([(a, "read", read), (b, "used", used)])
    assert a.incs == [10, 15, 15] and b.incs == [4, 5]
