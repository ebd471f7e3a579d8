"""The real app as the bench runs it: a deploy file with the bench's overrides, `chatterbox-serve serve` in its own
session, a readiness wait, and a teardown that leaves no process behind.

Start: `python3 -m serve_app.cli serve --config FILE --host 127.0.0.1 --port P [--checkpoint DIR]` with
`start_new_session=True`, stdout and stderr to a log file, Ray's files in a short private temp folder
(RAY_TMPDIR), Ray's metrics endpoint on a free port (CHATTERBOX_METRICS_PORT) and Ray's metrics reported every
second (RAY_metrics_report_interval_ms), so a scrape after a level sees the level.

Stop: SIGINT to the server's process group (`serve` shuts Serve down and stops its private Ray head, also while
still starting), then SIGTERM and SIGKILL to whatever of the server's process tree is still alive (the tree is
recorded while it runs; Ray's head and workers live in sessions of their own, so a process-group kill alone would
miss them), then, where asked, `ray stop --force` (every Ray instance on the machine: only on a machine the bench
has to itself).
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

log = logging.getLogger(__name__)

READY_PATH = "/readyz"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- the deploy file ----------------------------------------------------------------------------------------

def _app_args(raw: dict, path: Path) -> dict:
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application in 'applications', found {len(apps)}; pass a "
                         "deploy/*.yaml file")
    return apps[0].setdefault("args", {})


def _in_place_user_config(raw: dict, dotted: str) -> tuple[dict, str] | None:
    """(the `deployments:` entry holding a stage's user_config, the key below it) when `dotted` names a key of a
    user_config the deploy file keeps there (s3gen.user_config.X -> S3GenStage's entry, X)."""
    from serve_app.serving.config import IN_PLACE_USER_CONFIGS

    for name, stage in IN_PLACE_USER_CONFIGS.items():
        prefix = f"{stage}.user_config."
        if dotted.startswith(prefix):
            for entry in raw["applications"][0].get("deployments") or []:
                if entry.get("name") == name and isinstance(entry.get("user_config"), dict):
                    return entry, "user_config." + dotted[len(prefix):]
    return None


def with_overrides(raw: dict, overrides: Mapping[str, Any], path: Path = Path("deploy file")) -> dict:
    """A copy of a Ray Serve config file with `overrides` set inside its application's `args`.
    Keys are dotted paths below `args`: {"router.settings.max_seconds_per_char": 0.07, "watermark": False}.
    A key of a user_config the file keeps in its `deployments:` list (s3gen.user_config.*) is set there."""
    raw = copy.deepcopy(raw)
    args = _app_args(raw, path)
    for dotted, value in overrides.items():
        node = args
        found = _in_place_user_config(raw, dotted)
        if found is not None:
            node, dotted = found
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {} if node.get(key) is None else node[key]
                if not isinstance(node[key], dict):
                    raise ValueError(f"override {dotted}: '{key}' is not a mapping in {path}")
            node = node[key]
        node[leaf] = value
    return raw


def app_args(raw: dict) -> dict:
    return _app_args(copy.deepcopy(raw), Path("deploy file"))


def parse_override(text: str) -> tuple[str, Any]:
    """`router.settings.max_active_speech_requests=128` -> (path, 128); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r}: use KEY=VALUE with KEY a dotted path below the app's args, e.g. "
                         "router.settings.max_active_speech_requests=128")
    return key.strip(), yaml.safe_load(value)


# -- the process tree ---------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root` (children, their children, ...): pid -> start time."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st:
                parents.setdefault(st[0], []).append(int(entry.name))
                starts[int(entry.name)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in out:
                out[child] = starts[child]
                todo.append(child)
    return out


def _ray_executable() -> str:
    """`ray` beside this interpreter, on PATH, or in a `--target` install on PYTHONPATH (the GPU wheel bundle)."""
    candidate = Path(sys.executable).parent / "ray"
    if candidate.exists():
        return str(candidate)
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and (Path(entry) / "bin" / "ray").exists():
            return str(Path(entry) / "bin" / "ray")
    return shutil.which("ray") or "ray"


class AppServer:
    """One `chatterbox-serve serve` process and everything it starts."""

    def __init__(self, config_path: Path, *, log_path: Path, checkpoint: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None, metrics_port: int | None = None,
                 metrics_report_interval_ms: int = 1000, ray_stop_force: bool = False, watch: bool = False):
        self.config_path = config_path
        self.watch = watch             # `serve --watch`: a rewritten config file is deployed again (apply_user_config)
        self.log_path = log_path
        self.checkpoint = checkpoint
        self.host = host
        self.port = port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.metrics_report_interval_ms = metrics_report_interval_ms
        self.ray_stop_force = ray_stop_force
        self.proc: subprocess.Popen | None = None
        self.ray_tmp: str | None = None
        self.tree: dict[int, str] = {}
        self.started_at: float | None = None
        self.ready_after_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "serve_app.cli", "serve", "--config", str(self.config_path),
               "--host", self.host, "--port", str(self.port)]
        return cmd + (["--checkpoint", self.checkpoint] if self.checkpoint else []) + (["--watch"] if self.watch else [])

    def apply_user_config(self, raw: dict, user_config: Mapping[str, Any], timeout_s: float = 180.0) -> dict:
        """Rewrite the app's config file with S3Gen's user_config keys set (the app runs with --watch and deploys
        it again: the running replicas reconfigure) and wait until S3Gen reports them in GET /v1/memory.
        -> {"s3gen_pid_before", "s3gen_pid_after", "seconds"}: a changed pid means the replica was restarted."""
        before = self._s3gen_report()
        new = with_overrides(raw, {f"s3gen.user_config.{k}": v for k, v in user_config.items()}, self.config_path)
        tmp = self.config_path.with_suffix(".tmp")   # whole or not at all: the app's watcher reads it any time
        tmp.write_text(yaml.safe_dump(new, sort_keys=False))
        os.replace(tmp, self.config_path)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            report = self._s3gen_report()
            applied = (report or {}).get("user_config") or {}
            if all(applied.get(k) == v for k, v in user_config.items()):
                return {"s3gen_pid_before": (before or {}).get("pid"), "s3gen_pid_after": report.get("pid"),
                        "seconds": round(time.monotonic() - t0, 1)}
            time.sleep(0.5)
        raise TimeoutError(f"S3Gen did not report user_config {dict(user_config)} within {timeout_s:.0f} s")

    def _s3gen_report(self) -> dict | None:
        try:
            r = httpx.get(f"{self.base_url}/v1/memory", timeout=10)
            return r.json().get("stages", {}).get("s3gen") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def start(self) -> None:
        self.ray_tmp = tempfile.mkdtemp(prefix="cbsys-", dir="/tmp")   # Unix socket paths are length-limited
        env = {**os.environ, "CHATTERBOX_METRICS_PORT": str(self.metrics_port), "RAY_TMPDIR": self.ray_tmp,
               "RAY_metrics_report_interval_ms": str(self.metrics_report_interval_ms), "PYTHONUNBUFFERED": "1"}
        ray_bin = Path(_ray_executable()).parent
        if ray_bin.is_dir():
            env["PATH"] = f"{ray_bin}{os.pathsep}{env.get('PATH', '')}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        log.info("starting the app: %s (log %s)", " ".join(self.command()), self.log_path)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def remember_tree(self) -> None:
        """Records the server's live process tree (called while it runs; the teardown kills what it saw)."""
        if self.proc is not None and self.proc.poll() is None:
            self.tree.update(descendants(self.proc.pid))

    def log_tail(self, num_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-num_bytes:].decode(errors="replace")

    def wait_ready(self, timeout_s: float) -> float:
        """Polls GET /readyz until it answers 200; -> seconds from start. Raises if the server exits or times out."""
        if self.proc is None or self.started_at is None:
            raise RuntimeError("AppServer.wait_ready() before start()")
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode} before it was ready; log tail:\n"
                                   f"{self.log_tail()}")
            try:
                r = httpx.get(self.base_url + READY_PATH, timeout=10)
                if r.status_code == 200:
                    self.ready_after_s = time.monotonic() - self.started_at
                    self.remember_tree()
                    log.info("app ready after %.0f s", self.ready_after_s)
                    return self.ready_after_s
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}"
            self.remember_tree()
            time.sleep(2)
        raise TimeoutError(f"the app was not ready within {timeout_s:.0f} s (last answer: {last}); log tail:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGINT the server (`serve` then shuts Serve down and stops its Ray head, also while still starting),
        SIGTERM and SIGKILL if it hangs, then stop whatever of its recorded process tree is still alive."""
        if self.proc is None:
            return
        self.remember_tree()
        # a server still starting may not get to its Ctrl-C handling soon: the tree teardown below does the rest
        sigint_wait_s = timeout_s if self.ready_after_s is not None else min(timeout_s, 15.0)
        for sig, wait_s in ((signal.SIGINT, sigint_wait_s), (signal.SIGTERM, 10.0)):
            if self.proc.poll() is not None:
                break
            log.info("stopping the app (%s to process group %d)", sig.name, self.proc.pid)
            _signal_group(self.proc.pid, sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                log.warning("the app did not stop within %.0f s of %s", wait_s, sig.name)
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._stop_leftovers()
        if self.ray_stop_force:
            try:
                subprocess.run([_ray_executable(), "stop", "--force"], timeout=60, capture_output=True)
            except (OSError, subprocess.TimeoutExpired) as e:
                log.warning("ray stop --force failed: %s", e)
        if self.ray_tmp:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        self.trim_log()

    def trim_log(self, max_bytes: int = 3 * 2**20, head_bytes: int = 512 * 2**10) -> None:
        """Keeps the start-up and the end of a log past `max_bytes` (every request logs a few lines)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return
        if len(data) > max_bytes:
            cut = len(data) - (max_bytes - head_bytes)
            self.log_path.write_bytes(data[:head_bytes] + f"\n[... {cut - head_bytes} bytes cut by the bench ...]\n"
                                      .encode() + data[cut:])

    def _alive(self) -> list[int]:
        """Processes of the recorded tree that still run (same pid and start time: the same process)."""
        return [pid for pid, start in self.tree.items() if (_stat(pid) or (0, None))[1] == start]

    def _stop_leftovers(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, the processes of the recorded tree still alive (Ray's head, raylet, workers)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = self._alive()
            if not alive:
                return
            log.warning("%s to %d leftover processes of the app: %s", sig.name, len(alive), alive)
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while self._alive() and time.monotonic() < deadline:
                time.sleep(0.5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
