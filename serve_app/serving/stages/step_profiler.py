"""A torch.profiler window over a stage's engine steps under real load, for the kernel timeline that py-spy cannot
see and that Nsight Systems, where it is missing, would give.

Off unless `CHATTERBOX_PROFILE_DIR` is set in the replica's environment (a deploy file's
`ray_actor_options.runtime_env.env_vars`, or `bench_system.py --profile-steps`). Then the first step whose batch
holds at least `CHATTERBOX_PROFILE_MIN_BATCH` rows (T3: requests; S3Gen: streams) opens a window over the next
`CHATTERBOX_PROFILE_STEPS` steps, once per replica process. When it closes, the replica writes into the folder:
- `{stage}-{pid}.trace.json.gz`: the Chrome trace (chrome://tracing, Perfetto), CPU ops and, on CUDA, kernels
  and copies;
- `{stage}-{pid}.summary.json`: the steps' wall time, the batch sizes, and on CUDA the kernels' count and summed
  time (how much of a step the GPU spent in this process's kernels), the top kernels by time;
- `{stage}-{pid}.ops.txt`: `key_averages()` as a table.

The calls come from the thread that runs the steps (the profiler records that thread's ops); the files are written
by a thread of their own. A diagnostic, not for production: it slows the recorded steps, and writing them holds the
GIL for seconds (S3Gen: ~500k events in 40 steps; written inline, it stopped the replica for ~20 s on an H200, and
the bench level it landed in made no audio: bench/results/profile_served_step/); and a CUDA graph captured while serving inside the window (a shape the
start-up grid missed) is captured under the profiler, which CUDA may refuse (that step then fails).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serve_app.envs import get_envs

log = logging.getLogger(__name__)


@dataclass
class StepProfiler:
    stage: str
    out_dir: Path | None          # None: off
    steps: int = 50
    min_batch: int = 1
    _prof: torch.profiler.profile | None = None
    _done: bool = False
    _started_at: float = 0.0
    _batches: list[int] = field(default_factory=list)
    writer: threading.Thread | None = None   # writes the files once the window closes

    @classmethod
    def from_env(cls, stage: str) -> StepProfiler:
        e = get_envs()
        return cls(stage, e.profile_dir, steps=e.profile_steps, min_batch=e.profile_min_batch)

    @property
    def recording(self) -> bool:
        return self._prof is not None

    def step_done(self, batch: int) -> None:
        """After each step, in the thread that runs them: opens the window (for the steps after this one) at the
        first batch of at least `min_batch`, counts the steps in it, and writes the files when it is full."""
        if self.out_dir is None or self._done:
            return
        if self._prof is None:
            if batch >= self.min_batch:
                self._start()
            return
        self._batches.append(batch)
        if len(self._batches) >= self.steps:
            self._finish()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False)
        self._prof.__enter__()
        self._started_at = time.perf_counter()
        log.info("%s: profiling the next %d steps into %s", self.stage, self.steps, self.out_dir)

    def _finish(self) -> None:
        prof, self._prof, self._done = self._prof, None, True
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._started_at
        prof.__exit__(None, None, None)
        self.writer = threading.Thread(target=self._write_logged, args=(prof, wall), daemon=True,
                                       name=f"{self.stage}-profile-writer")
        self.writer.start()

    def _write_logged(self, prof: torch.profiler.profile, wall: float) -> None:
        try:
            self._write(prof, wall)
        except Exception:  # noqa: BLE001 - a diagnostic must not take the replica down
            log.exception("%s: writing the profile failed", self.stage)

    def _write(self, prof: torch.profiler.profile, wall: float) -> None:
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{self.stage}-{os.getpid()}"
        prof.export_chrome_trace(f"{stem}.trace.json.gz")
        averages = prof.key_averages()
        sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        Path(f"{stem}.ops.txt").write_text(averages.table(sort_by=sort, row_limit=60))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]   # and copies
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        busy_us = sum(sum(v) for v in by_name.values())
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
        n = max(1, len(self._batches))
        summary = {
            "stage": self.stage, "pid": os.getpid(), "steps": len(self._batches), "wall_s": wall,
            "step_mean_s": wall / n, "batch_mean": sum(self._batches) / n, "batches": self._batches,
            "device_events": len(kernels), "device_events_per_step": len(kernels) / n,
            "device_time_s": busy_us / 1e6,          # summed durations: kernels of other streams may overlap
            "device_time_per_step_s": busy_us / 1e6 / n,
            "top_device_ops": [{"name": n[:160], "count": len(v), "total_ms": sum(v) / 1e3, "mean_us": sum(v) / len(v)}
                               for n, v in top],
        }
        Path(f"{stem}.summary.json").write_text(json.dumps(summary, indent=2))
        log.info("%s: profiled %d steps (%.3f s, %d device events) -> %s.*", self.stage, len(self._batches), wall,
                 len(kernels), stem)
