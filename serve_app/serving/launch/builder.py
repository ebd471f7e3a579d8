"""Builders: a validated `ServeConfig` -> a bound Ray Serve `Application`.

    SpeechIngress (HTTP)  ->  T3Stage  ->  VoiceStage
                          ->  S3GenStage -> VoiceStage
                          ->  VoiceStage

`build_app(config)` is what `chatterbox-serve serve` runs; `app_builder(args)` is the entry a Ray Serve config
file names (`import_path: serve_app.serving.launch.builder:app_builder`, `args:` = a ServeConfig), so the same
deploy/*.yaml works with `serve run`, `serve deploy` and KubeRay.
"""
from __future__ import annotations

import logging
from typing import Any

from ray import serve

from serve_app.serving.config import ServeConfig

log = logging.getLogger(__name__)

# Upstream prints a tqdm bar per T3 request; keep replica logs readable.
_REPLICA_ENV = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cluster_num_gpus() -> float:
    """GPUs the Ray cluster has (if Ray is up), else what torch sees on this machine."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    try:
        import torch

        return float(torch.cuda.device_count())
    except Exception:
        return 0.0


def resolve_config(config: ServeConfig, num_gpus: float | None = None) -> ServeConfig:
    """Env defaults, then the device choice against the cluster's GPUs."""
    config = config.with_env_defaults()
    return config.for_cluster(cluster_num_gpus() if num_gpus is None else num_gpus)


def resolve_checkpoint_for(config: ServeConfig) -> Any:
    from serve_app.model.loader import resolve_checkpoint

    c = config.checkpoint
    return resolve_checkpoint(c.source, preset=c.preset, multilingual=c.multilingual, allow_random=c.allow_random)


def _options(settings: Any, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Deployment options; the replica's environment is ours, then the deploy file's (`ray_actor_options.
    runtime_env.env_vars`), then `extra_env`."""
    opts = settings.to_options()
    own = (opts["ray_actor_options"].get("runtime_env") or {}).get("env_vars", {})
    opts["ray_actor_options"] = {**opts["ray_actor_options"],
                                 "runtime_env": {"env_vars": {**_REPLICA_ENV, **own, **(extra_env or {})}}}
    return opts


def router_settings(config: ServeConfig, checkpoint: Any) -> dict[str, Any]:
    """The router's settings: the config's `router.settings` plus what only the builder knows."""
    source = "random" if checkpoint.is_random else checkpoint.source
    desc = f"{source}:{checkpoint.path}" if source != "hub" else f"hub:ResembleAI/chatterbox@{checkpoint.revision}"
    return {
        "is_random_weights": bool(checkpoint.is_random),
        "checkpoint_source": desc,
        "multilingual": bool(checkpoint.multilingual),
        "watermark": bool(config.watermark),
        "api_keys": list(config.api_keys or []),
        **config.router.settings,
    }


def build_app(config: ServeConfig, *, checkpoint: Any = None, resolve: bool = True) -> serve.Application:
    """Bind the four deployments. `resolve=False` takes the config as already resolved (tests, run.py)."""
    from serve_app.serving.api.ingress import SpeechIngress
    from serve_app.serving.stages.s3gen_stage import S3GenStage
    from serve_app.serving.stages.t3_stage import T3Stage
    from serve_app.serving.stages.voice_stage import VoiceStage

    if resolve:
        config = resolve_config(config)
    checkpoint = checkpoint or resolve_checkpoint_for(config)
    log.info("building app %r: device=%s weights=%s quantization=%s watermark=%s", config.app_name, config.device,
             checkpoint.describe(), config.quantization or "none", config.watermark)
    for name, s in config.stages().items():
        log.info("  %-6s backend=%s replicas=%s num_gpus=%s num_cpus=%s max_ongoing=%d max_queued=%d", name,
                 getattr(s, "backend", "-"), s.num_replicas if s.autoscaling_config is None else
                 f"{s.autoscaling_config.min_replicas}..{s.autoscaling_config.max_replicas}", s.num_gpus,
                 s.ray_actor_options.num_cpus, s.max_ongoing_requests, s.max_queued_requests)

    voice = VoiceStage.options(**_options(config.voice)).bind(checkpoint, config.voice)
    t3 = T3Stage.options(**_options(config.t3), user_config=config.t3.user_config.model_dump()).bind(
        checkpoint, voice, config.t3, config.quantization)
    # S3Gen calls T3 itself (tokens go T3 -> S3Gen in blocks; the router gets only audio)
    s3gen = S3GenStage.options(**_options(config.s3gen), user_config=config.s3gen.user_config.model_dump()).bind(
        checkpoint, voice, config.s3gen, config.quantization, t3_handle=t3)
    return SpeechIngress.options(**_options(config.router)).bind(t3, s3gen, voice,
                                                                 router_settings(config, checkpoint))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve config-file entry: `args` is a ServeConfig mapping (validated here)."""
    return build_app(ServeConfig.model_validate(args or {}))
