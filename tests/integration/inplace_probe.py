"""Run in a process of its own by test_inplace_update.py: a private Ray and the tiny app deployed the way
`chatterbox-serve serve --watch` deploys it (Serve's config path, as `serve deploy` and KubeRay), then its deploy
file changed twice and picked up by the watcher: S3Gen's user_config in the file's `deployments:` list, then a value
under `args`. Prints one JSON line: the S3Gen and T3 reports of GET /v1/memory after each deploy, and a speech
request's answer after the first change.
    python tests/integration/inplace_probe.py CHECKPOINT"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]


def main(checkpoint: str) -> dict:
    from ray import serve
    from ray.serve._private.api import serve_start

    from serve_app.serving.config import load_deploy_file
    from serve_app.serving.launch import run
    from serve_app.serving.launch.local_ray import free_ports, start_local_ray

    root = Path(tempfile.mkdtemp(prefix="cbip-", dir="/tmp"))   # short: Ray's socket paths are length-limited
    http_port, metrics_port = free_ports(2)
    raw = yaml.safe_load((REPO / "deploy" / "cpu-tiny.yaml").read_text())
    app = raw["applications"][0]
    app["args"]["checkpoint"]["source"] = checkpoint
    app["args"]["voice"]["voices_dir"] = str(root / "voices")
    s3gen_entry = next(d for d in app["deployments"] if d["name"] == "S3GenStage")
    path = root / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))

    def memory(done, timeout_s: float) -> dict:
        """GET /v1/memory until `done(stages)` (replicas restarting answer errors meanwhile)."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{http_port}/v1/memory", timeout=10)
                last = r.json().get("stages") if r.status_code == 200 else r.text
                if isinstance(last, dict) and all("pid" in last.get(s, {}) for s in ("t3", "s3gen")) and done(last):
                    return {s: last[s] for s in ("t3", "s3gen")}
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(1.0)
        raise TimeoutError(f"/v1/memory did not get there in {timeout_s:.0f} s; last: {last}")

    local = start_local_ray(num_cpus=4, temp_dir=str(root / "ray"), metrics_port=metrics_port,
                            log_file=root / "ray-head.log")
    try:
        client = serve_start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
        config = load_deploy_file(path).config
        run._deploy(client, config, "127.0.0.1", http_port)
        watcher = run._Watcher(client, path, config, "127.0.0.1", http_port)
        out = {"deployed": memory(lambda m: True, 600)}
        s3gen_entry["user_config"]["max_batch_tokens"] = 96
        path.write_text(yaml.safe_dump(raw))
        watcher()
        out["user_config_changed"] = memory(lambda m: m["s3gen"].get("max_batch_tokens") == 96, 120)
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/audio/speech",   # the reconfigured replicas still serve
                       json={"input": "After the change.", "response_format": "wav"}, timeout=300)
        out["speech_after_change"] = {"status": r.status_code, "bytes": len(r.content),
                                      "content_type": r.headers.get("content-type")}
        app["args"]["s3gen"]["max_cached_voices"] = 32
        path.write_text(yaml.safe_dump(raw))
        watcher()
        pid = out["user_config_changed"]["s3gen"]["pid"]
        out["args_changed"] = memory(lambda m: m["s3gen"]["pid"] != pid, 600)
        return out
    finally:
        try:
            serve.shutdown()
        finally:
            local.stop()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
