"""A running app's S3Gen scheduler knobs change without restarting a replica (issue: tuning on KubeRay).

The deploy files keep S3Gen's user_config in their application's `deployments:` list, Serve's place for it: Serve
applies a change there through each replica's `reconfigure`. The tiny app deployed as `chatterbox-serve serve
--watch` deploys it, in a Ray of its own (`inplace_probe.py`, a subprocess: the session's shared app runs in this
process's Ray), then its deploy file changed twice.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("inplace_probe.py")


def test_a_new_s3gen_user_config_applies_in_place_and_a_new_arg_restarts(tiny_checkpoint):
    proc = subprocess.run([sys.executable, str(PROBE), str(tiny_checkpoint)], capture_output=True, text=True,
                          timeout=1500, cwd=PROBE.parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, tuned, restarted = out["deployed"], out["user_config_changed"], out["args_changed"]
    # the config path applied the file's deployments entry, not the stage's defaults
    assert first["s3gen"]["max_batch_tokens"] == 64
    # a new user_config: the same processes, the new value
    assert tuned["s3gen"]["max_batch_tokens"] == 96 and tuned["s3gen"]["user_config"]["max_batch_tokens"] == 96
    assert tuned["s3gen"]["pid"] == first["s3gen"]["pid"] and tuned["t3"]["pid"] == first["t3"]["pid"]
    speech = out["speech_after_change"]   # and they serve: a WAV of the capped length's order
    assert speech["status"] == 200 and speech["content_type"].startswith("audio/wav") and speech["bytes"] > 10_000
    # a change under args is a new code version to Serve: new processes (what the test would see if the
    # user_config were kept under args), and the replica still runs the deployed user_config
    assert restarted["s3gen"]["pid"] != tuned["s3gen"]["pid"] and restarted["t3"]["pid"] != tuned["t3"]["pid"]
    assert restarted["s3gen"]["max_batch_tokens"] == 96
