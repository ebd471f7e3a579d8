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

from serve_app.serving.config import DeployFile, ServeConfig, load_deploy_file
from serve_app.serving.launch.local_ray import start_local_ray

log = logging.getLogger(__name__)



def run_app(config: ServeConfig, *, host: str, port: int, blocking: bool = False) -> Any:
    """Serve `config` on a running Ray instance; returns the ingress handle."""
    from ray import serve

    from serve_app.serving.launch.builder import build_app, resolve_checkpoint_for, resolve_config

    config = resolve_config(config)
    checkpoint = resolve_checkpoint_for(config)
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    handle = serve.run(build_app(config, checkpoint=checkpoint, resolve=False), name=config.app_name,
                       route_prefix=config.route_prefix, blocking=False)
    log.info("serving %s on http://%s:%d%s", checkpoint.describe(), host, port, config.route_prefix)
    if blocking:
        wait_forever()
    return handle


def wait_forever() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        time.sleep(0.5)


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
               metrics_port: int | None = None) -> None:
    """Validate the deploy file, start Ray, run the app and block. Arguments override the file (http_options for
    host/port; `checkpoint` for the checkpoint source: a folder, 'hub' or 'random')."""
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
        run_app(config, host=host or deploy.host, port=port or deploy.port, blocking=True)
    finally:
        from ray import serve

        log.info("shutting down")
        try:
            serve.shutdown()
        finally:
            local.stop()
