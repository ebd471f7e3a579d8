"""A fresh, private, single-node Ray instance on loopback with explicit ports, and its clean shutdown.

Why not `ray.init()`: it picks the agents' ports at random and the raylet then waits a fixed ~30 s for their port
files, which a loaded 2-core machine misses ("Timed out waiting for file .../metrics_agent_port_*"). Giving
every port explicitly (free ports found here) removes that wait, lets a Prometheus server be pointed at the
metrics port, and keeps two instances on one machine from colliding. The head runs as
`ray start --head --block` in a child process, so stopping it (SIGTERM to that process) tears down exactly
this instance and never another cluster on the machine (`ray stop` would kill them all).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.envs import ray_process_env

log = logging.getLogger(__name__)

_PORT_NAMES = ("gcs", "node_manager", "object_manager", "metrics_agent", "dashboard_agent_listen",
               "runtime_env_agent", "ray_client_server")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_head_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The project's Ray variables (envs.ray_process_env) for the head; Serve's HTTP proxy and every worker inherit
    them from it. A value already set in `environ` is kept, with a warning: it replaces the project's."""
    wanted = ray_process_env()
    for name, value in wanted.items():
        if environ.get(name, value) != value:
            log.warning("%s is set to %r: keeping it, so the proxy runs without %s", name, environ[name], value)
    return {name: environ.get(name, value) for name, value in wanted.items()}


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


@dataclass
class LocalRay:
    process: subprocess.Popen
    address: str
    temp_dir: str | None
    ports: dict[str, int] = field(default_factory=dict)

    def stop(self, timeout_s: float = 30.0) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)   # `ray start --block` stops its own processes on SIGTERM
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("ray head (pid %d) did not stop in %.0fs; killing its process group", self.process.pid,
                            timeout_s)
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)   # the group this module created for the head
                except ProcessLookupError:
                    pass
                self.process.wait(10)


def start_local_ray(*, num_cpus: float | None = None, num_gpus: int | None = None, temp_dir: str | None = None,
                    metrics_port: int | None = None, host: str = "127.0.0.1", timeout_s: float = 300.0,
                    log_file: str | Path | None = None, env: dict[str, str] | None = None) -> LocalRay:
    """Start the head, wait until it accepts a driver, connect this process to it (`ray.init`)."""
    import ray

    temp_dir = temp_dir or os.environ.get("RAY_TMPDIR")
    ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES), host)))
    if metrics_port is not None and 10002 <= metrics_port <= 19999:
        raise ValueError(f"metrics port {metrics_port} is inside Ray's worker port range 10002-19999; pick another "
                         "(e.g. 8080)")
    ports["metrics_export"] = metrics_port or free_ports(1, host)[0]
    cmd = [_ray_executable(), "start", "--head", "--block", "--disable-usage-stats", f"--node-ip-address={host}",
           f"--port={ports['gcs']}", f"--node-manager-port={ports['node_manager']}",
           f"--object-manager-port={ports['object_manager']}",
           f"--dashboard-agent-grpc-port={ports['metrics_agent']}",
           f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
           f"--runtime-env-agent-port={ports['runtime_env_agent']}",
           f"--ray-client-server-port={ports['ray_client_server']}",
           f"--metrics-export-port={ports['metrics_export']}", "--include-dashboard=false"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    if temp_dir:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        cmd.append(f"--temp-dir={temp_dir}")
    # `ray start` turns token authentication on unless told otherwise, while a connecting driver reads
    # RAY_AUTH_MODE (default off) when ray is imported: give the head the driver's setting so both agree.
    extra_env = env or {}   # for the head and so its workers (e.g. CHATTERBOX_API_KEYS: a secret stays out of configs)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.update(ray_head_env(os.environ))
    env.update(extra_env)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    log.info("starting a private Ray head: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"{host}:{ports['gcs']}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}"
                               + (f"; see {log_file}" if log_file else "; pass log_file to see why"))
        try:
            with socket.create_connection((host, ports["gcs"]), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"Ray head did not open its GCS port {ports['gcs']} in {timeout_s:.0f}s")
            time.sleep(0.5)
    local = LocalRay(proc, address, temp_dir, ports)
    while True:
        try:
            ray.init(address=address, log_to_driver=True)   # waits for the node to register
            break
        except Exception as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                local.stop()
                raise RuntimeError(f"could not connect to the private Ray head at {address}: {e}") from e
            log.info("Ray head not ready yet (%s); retrying", str(e)[:120])
            time.sleep(2)
    log.info("private Ray instance up at %s (metrics on :%d, temp dir %s): %s", address, ports["metrics_export"],
             temp_dir or "default", ray.cluster_resources())
    return local
