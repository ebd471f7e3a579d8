"""The stage step profiler: a real torch.profiler window (CPU here) opened by load, written once."""
from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import torch

from serve_app.serving.stages.step_profiler import StepProfiler


def _work() -> None:
    torch.mm(torch.randn(32, 32), torch.randn(32, 32))


def test_the_window_opens_at_the_first_full_batch_and_records_that_many_steps(tmp_path: Path):
    prof = StepProfiler("t3", tmp_path, steps=3, min_batch=4)
    for batch in (1, 2, 3):                  # below min_batch: nothing
        _work()
        prof.step_done(batch)
    assert not prof.recording and not list(tmp_path.iterdir())
    prof.step_done(4)                        # opens the window for the steps after this one
    assert prof.recording
    for batch in (5, 6, 7):
        _work()
        prof.step_done(batch)
    assert not prof.recording
    assert prof.writer.name == "t3-profile-writer"   # files are written off the step thread
    prof.writer.join(timeout=60)
    (summary,) = tmp_path.glob("t3-*.summary.json")
    s = json.loads(summary.read_text())
    assert s["steps"] == 3 and s["batches"] == [5, 6, 7] and s["batch_mean"] == 6 and s["wall_s"] > 0
    (trace,) = tmp_path.glob("t3-*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert sum(e.get("name") == "aten::mm" for e in events) == 3      # the three recorded steps' ops, no more
    assert "aten::mm" in next(tmp_path.glob("t3-*.ops.txt")).read_text()
    for batch in (8, 9, 10, 11):             # once per process: no second window
        prof.step_done(batch)
    assert not prof.recording and len(list(tmp_path.iterdir())) == 3


def test_off_without_a_folder(monkeypatch):
    from serve_app.envs import get_envs

    monkeypatch.delenv("CHATTERBOX_PROFILE_DIR", raising=False)
    get_envs.cache_clear()
    prof = StepProfiler.from_env("s3gen")
    for batch in range(1, 5):
        prof.step_done(batch)
    assert prof.out_dir is None and not prof.recording


def test_the_t3_engine_backend_profiles_its_steps(tmp_path: Path, monkeypatch):
    """Wired into the T3 step thread: CHATTERBOX_PROFILE_* in the replica's environment is all it takes."""
    from serve_app.contracts import T3Job
    from serve_app.envs import get_envs
    from serve_app.serving.stages.t3_backend import EngineT3Backend
    from tests.unit.test_stage_shims import FakeEngine, FakeTokenizer, _conds

    monkeypatch.setenv("CHATTERBOX_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("CHATTERBOX_PROFILE_STEPS", "2")
    monkeypatch.setenv("CHATTERBOX_PROFILE_MIN_BATCH", "2")
    get_envs.cache_clear()
    class Together(FakeEngine):   # no step before both requests are in: one 2-row step at least, on a slow CI too
        added = 0

        def add_request(self, req):
            self.added += 1
            super().add_request(req)

        def has_unfinished(self):
            return self.added >= 2 and super().has_unfinished()

    backend = EngineT3Backend(Together(steps_per_request=6), FakeTokenizer())
    conds = backend.prepare_conds(_conds())

    async def run():
        async def one(i):
            return [c async for c in backend.generate(T3Job(f"r{i}", "Hi.", "default"), conds)]
        await asyncio.gather(*(one(i) for i in range(2)))

    try:
        asyncio.run(run())
    finally:
        backend.close()
        get_envs.cache_clear()
    backend._profiler.writer.join(timeout=60)
    (summary,) = tmp_path.glob("t3-*.summary.json")
    assert json.loads(summary.read_text())["steps"] == 2


def test_the_s3gen_replica_profiles_its_steps(tmp_path: Path, monkeypatch):
    """Wired into the S3Gen replica's step (in its executor thread, where the engine runs)."""
    from serve_app.contracts import SpeechJob
    from serve_app.envs import get_envs
    from serve_app.serving.config import S3GenSettings
    from serve_app.serving.stages.s3gen_stage import S3GenReplica
    from tests.unit.test_stage_shims import BlockT3, FakeS3GenBackend, FakeVoiceHandle

    monkeypatch.setenv("CHATTERBOX_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("CHATTERBOX_PROFILE_STEPS", "2")
    get_envs.cache_clear()
    try:
        replica = S3GenReplica(None, FakeVoiceHandle(), S3GenSettings(), backend=FakeS3GenBackend(),
                               t3_handle=BlockT3())

        async def run():
            job = SpeechJob("s", "Hi.", "default", first_step_tokens=10, step_tokens=10)
            return [b async for b in replica.synthesize(job)]

        blocks = asyncio.run(run())
    finally:
        get_envs.cache_clear()
    assert blocks[-1].finished and len(blocks) >= 4       # enough steps: one opens the window, two fill it
    replica._profiler.writer.join(timeout=60)
    (summary,) = tmp_path.glob("s3gen-*.summary.json")
    assert json.loads(summary.read_text())["steps"] == 2
