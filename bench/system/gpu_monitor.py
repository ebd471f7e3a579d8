"""GPU memory of every process, sampled once a second through NVML (nvidia-ml-py) in a background thread.

Each sample: seconds since the monitor started, the bench phase it fell in, used MiB per GPU (all processes, as
nvidia-smi shows it) and used MiB per process where the driver reports it. Without NVML (a CPU machine) the
monitor records nothing and says why.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 2**20


def _process_name(pid: int) -> str:
    """`ray::ServeReplica:chatterbox:T3Stage` and the like (Ray sets process titles), or the executable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120] or "?"


class GpuMonitor:
    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self.process_names: dict[int, str] = {}
        self.phase = "start"
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._nvml = None
        self._handles: list = []

    # -- device facts -------------------------------------------------------------------------------------

    def start(self) -> GpuMonitor:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:  # noqa: BLE001 - no NVML, no driver, no GPU: all mean "not sampled"
            self.unavailable = f"{type(e).__name__}: {e}"
            log.info("GPU memory not sampled (%s)", self.unavailable)
            return self
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def device_info(self) -> list[dict]:
        """Name, memory and driver of each GPU (empty without NVML)."""
        if self._nvml is None:
            return []
        nv = self._nvml
        driver = _str(nv.nvmlSystemGetDriverVersion())
        try:
            cuda = nv.nvmlSystemGetCudaDriverVersion_v2()
            cuda = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except Exception:  # noqa: BLE001 - older drivers lack the call
            cuda = None
        return [{"index": i, "name": _str(nv.nvmlDeviceGetName(h)),
                 "memory_total_mib": nv.nvmlDeviceGetMemoryInfo(h).total // MIB,
                 "driver": driver, "cuda_driver": cuda} for i, h in enumerate(self._handles)]

    # -- sampling -----------------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self._t0

    def _sample(self) -> dict:
        nv = self._nvml
        used, procs = [], {}
        for h in self._handles:
            used.append(nv.nvmlDeviceGetMemoryInfo(h).used // MIB)
            try:
                running = nv.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001 - not supported on every driver / in every container
                running = []
            for p in running:
                if p.usedGpuMemory is not None:
                    procs[p.pid] = procs.get(p.pid, 0) + p.usedGpuMemory // MIB
                    if p.pid not in self.process_names:
                        self.process_names[p.pid] = _process_name(p.pid)
        return {"t_s": round(self.now(), 2), "phase": self.phase, "used_mib": used, "total_used_mib": sum(used),
                "process_mib": {str(k): v for k, v in procs.items()}}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except Exception as e:  # noqa: BLE001 - keep sampling; report the first failure
                if self.unavailable is None:
                    self.unavailable = f"sampling failed: {type(e).__name__}: {e}"
                    log.warning("GPU sampling failed: %s", e)
            self._stop.wait(self.interval_s)

    def peak_mib(self, since_s: float, until_s: float | None = None) -> int | None:
        """Highest total used MiB (all GPUs, all processes) sampled within [since_s, until_s]."""
        until_s = self.now() if until_s is None else until_s
        xs = [s["total_used_mib"] for s in self.samples if since_s <= s["t_s"] <= until_s]
        return max(xs) if xs else None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
            self._nvml = None

    def to_json(self) -> dict:
        return {"interval_s": self.interval_s, "unavailable": self.unavailable,
                "process_names": {str(k): v for k, v in self.process_names.items()}, "samples": self.samples}


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
