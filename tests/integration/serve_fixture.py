"""One real Ray Serve app for the whole integration session: CPU, tiny random weights, loopback, free ports.

Start-up is the slow part (Ray plus four replicas loading models on 2 cores), so every integration test shares
this instance. Ray's files go under a short temporary folder (Unix socket paths are length-limited).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serve_app.serving.config import ServeConfig, load_deploy_file
from serve_app.serving.launch.local_ray import LocalRay, free_ports, start_local_ray

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-integration"
MAX_NEW_TOKENS = 30                # random weights never stop: every text chunk is cut at 30 sampled tokens
MAX_VOICE_UPLOAD_BYTES = 400_000


@dataclass
class ServeInstance:
    base_url: str
    metrics_url: str
    metrics_port: int
    config: ServeConfig
    ray: LocalRay
    root: Path

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=kwargs.pop("timeout", 180), **kwargs)


def test_config(checkpoint: Path, voices_dir: Path) -> ServeConfig:
    """deploy/cpu-tiny.yaml with the test's checkpoint, voices folder, API key and small limits."""
    base = load_deploy_file(REPO / "deploy" / "cpu-tiny.yaml").config
    data = base.model_dump(mode="json")
    data["checkpoint"]["source"] = str(checkpoint)
    data["voice"]["voices_dir"] = str(voices_dir)
    data["api_keys"] = None   # from CHATTERBOX_API_KEYS in Ray's environment (start_serve): never in a config
    data["watermark"] = False
    # max_stall_s: a stalled stage surfaces as an error well inside the tests' 120-150 s client bounds
    data["router"]["settings"].update(max_new_tokens=MAX_NEW_TOKENS, max_input_chars=1000,
                                      max_voice_upload_bytes=MAX_VOICE_UPLOAD_BYTES, min_voice_duration_s=1.0,
                                      max_stall_s=60.0)
    return ServeConfig.model_validate(data)


def start_serve(checkpoint: Path) -> ServeInstance:
    from serve_app.serving.launch.run import run_app

    root = Path(tempfile.mkdtemp(prefix="cbit-", dir="/tmp"))
    config = test_config(checkpoint, root / "voices")
    http_port, metrics_port = free_ports(2)
    t0 = time.monotonic()
    local = start_local_ray(num_cpus=4, temp_dir=str(root / "ray"), metrics_port=metrics_port,
                            log_file=root / "ray-head.log", env={"CHATTERBOX_API_KEYS": API_KEY})
    try:
        run_app(config, host="127.0.0.1", port=http_port)
    except BaseException:
        local.stop()
        raise
    log.info("Ray Serve up in %.0fs on port %d", time.monotonic() - t0, http_port)
    return ServeInstance(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics", metrics_port,
                         config, local, root)


def stop_serve(instance: ServeInstance) -> None:
    from ray import serve

    try:
        serve.shutdown()
    finally:
        instance.ray.stop()
        shutil.rmtree(instance.root, ignore_errors=True)


def reference_wav(seconds: float, seed: int, sr: int = 24_000) -> bytes:
    """A synthetic voice reference clip as mono PCM16 WAV, for enrollment."""
    from serve_app.model.checkpoint import synthetic_reference
    from serve_app.serving.audio import to_wav_bytes

    return to_wav_bytes(synthetic_reference(seconds=seconds, sr=sr, seed=seed), sr)
