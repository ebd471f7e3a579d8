"""`chatterbox-serve serve`: start a fresh private Ray, run the app from a deploy file, block until interrupted.

Always starts a new single-node Ray instance with explicit loopback ports (local_ray.py): other Ray clusters
may be running on the machine and are never joined or stopped. Ray's files go under RAY_TMPDIR (or Ray's
default), the dashboard is off, and the Prometheus metrics port is explicit (CHATTERBOX_METRICS_PORT /
`metrics_port`, default 8080) so a scraper knows where to look.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from serve_app.serving.config import DeployFile, ServeConfig, load_deploy_file, to_deploy_file
from serve_app.serving.launch.local_ray import start_local_ray

log = logging.getLogger(__name__)



def run_app(config: ServeConfig, *, host: str, port: int, blocking: bool = False,
            watch: Path | None = None) -> None:
    """Deploy `config` on a running Ray instance and wait until it runs. Through Serve's config path, as `serve
    deploy` and KubeRay do (`to_deploy_file`), so a later deploy that changes only S3Gen's user_config is applied
    to the running replicas. blocking: then serve until interrupted; `watch`: meanwhile deploy that file again
    whenever it changes (load_deploy_file's validation first; `config`'s checkpoint source kept)."""
    from ray.serve._private.api import serve_start   # what `serve run config.yaml` uses; no dashboard needed

    from serve_app.serving.launch.builder import resolve_checkpoint_for, resolve_config

    if config.api_keys:
        log.warning("api_keys in the deploy file go into the Serve config, which Ray logs and shows; "
                    "set CHATTERBOX_API_KEYS in the environment instead")
    checkpoint = resolve_checkpoint_for(resolve_config(config))   # here first: a random one is written once
    client = serve_start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    _deploy(client, config, host, port)
    log.info("serving %s on http://%s:%d%s", checkpoint.describe(), host, port, config.route_prefix)
    if blocking:
        wait_forever(None if watch is None else _Watcher(client, watch, config, host, port))


def _deploy(client: Any, config: ServeConfig, host: str, port: int, wait: bool = True) -> None:
    """Deploy and (wait) wait until the application runs. The config goes as it is: the app's builder fills env
    defaults (CHATTERBOX_API_KEYS among them) and the device choice in Serve's build task, so a key from the
    environment is never written into the Serve config, which Ray logs and shows."""
    from ray.serve.schema import ServeDeploySchema

    client.deploy_apps(ServeDeploySchema.model_validate(to_deploy_file(config, host, port)))
    if wait:
        wait_running(config.app_name)


def wait_running(app_name: str, poll_s: float = 0.5) -> None:
    """Until Serve reports the application RUNNING; its message if it fails to deploy."""
    from ray import serve

    while True:
        app = serve.status().applications.get(app_name)
        status = str(getattr(app, "status", ""))
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            raise RuntimeError(f"application {app_name!r} {status}: {app.message}")
        time.sleep(poll_s)


class _Watcher:
    """Deploys the deploy file again when its contents change (an invalid one is logged, not run). Called from
    wait_forever's loop, so it never blocks on the deploy (its progress: GET /readyz, the replicas' logs) and never
    raises: the app keeps serving what it runs."""

    def __init__(self, client: Any, path: Path, started: ServeConfig, host: str, port: int) -> None:
        self.client, self.path, self.started, self.host, self.port = client, path, started, host, port
        self.text = path.read_text()

    def __call__(self) -> None:
        text = self.path.read_text()
        if text == self.text:
            return
        self.text = text
        try:
            config = load_deploy_file(self.path).config
        except Exception as exc:  # noqa: BLE001 - YAML or validation errors (pydantic's are ValueErrors)
            log.error("%s changed but does not validate; still serving the last good one: %s", self.path, exc)
            return
        config = config.model_copy(update={"checkpoint": self.started.checkpoint})
        log.info("%s changed: deploying it (S3Gen's user_config is applied to the running replicas; a change "
                 "under args restarts them)", self.path)
        try:
            _deploy(self.client, config, self.host, self.port, wait=False)
        except Exception:  # noqa: BLE001 - a refused deploy leaves the running app as it is
            log.exception("deploying %s failed; still serving the last good one", self.path)


def wait_forever(tick: Any = None, every_s: float = 0.5) -> None:
    """Until SIGINT or SIGTERM; `tick()` every `every_s` meanwhile."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(every_s):
        if tick is not None:
            tick()


def local_num_cpus(config: ServeConfig) -> int:
    """Logical CPUs for the local Ray head: the machine's cores, or what the deploy file's replicas reserve if
    that is more. Ray's CPU count is a scheduling budget, not a limit: on a small box (2 cores) a config that
    reserves 4 would otherwise leave replicas pending forever."""
    cores = os.cpu_count() or 1
    wanted = math.ceil(config.cpus_requested())
    if wanted > cores:
        log.warning("the deploy file reserves %d CPUs for its replicas and this machine has %d cores: starting "
                    "Ray with %d logical CPUs (the replicas share the cores)", wanted, cores, wanted)
    return max(cores, wanted)


def serve_main(config_path: str | Path, host: str | None = None, port: int | None = None, *,
               checkpoint: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
               metrics_port: int | None = None, watch: bool = False) -> None:
    """Validate the deploy file, start Ray, run the app and block. Arguments override the file (http_options for
    host/port; `checkpoint` for the checkpoint source: a folder, 'hub' or 'random'); `watch`: deploy the file
    again whenever it changes."""
    if not logging.getLogger().handlers:
        from serve_app.envs import get_envs

        logging.basicConfig(level=get_envs().log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    deploy: DeployFile = load_deploy_file(config_path)
    config = deploy.config
    if checkpoint:
        config = config.model_copy(update={"checkpoint": config.checkpoint.model_copy(update={"source": checkpoint})})
    if metrics_port is None:
        from serve_app.envs import get_envs

        metrics_port = get_envs().metrics_port
    if num_cpus is None:
        num_cpus = local_num_cpus(config)
    local = start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus, metrics_port=metrics_port)
    try:
        run_app(config, host=host or deploy.host, port=port or deploy.port, blocking=True,
                watch=Path(config_path) if watch else None)
    finally:
        from ray import serve

        log.info("shutting down")
        try:
            serve.shutdown()
        finally:
            local.stop()
