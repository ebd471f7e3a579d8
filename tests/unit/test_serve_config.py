"""The serve config: deploy files validate, errors name the fix, CPU forcing, builder options."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.serving.config import ServeConfig, load_deploy_file, stage_device

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("name", ["cpu-tiny", "default", "gpu-1x"])
def test_deploy_files_validate(name):
    deploy = load_deploy_file(DEPLOY / f"{name}.yaml")
    assert deploy.config.app_name == "chatterbox"
    assert deploy.config.t3.max_queued_requests > 0 and deploy.config.s3gen.max_queued_requests > 0


def test_cpu_forcing_warns_and_zeroes_gpus(caplog):
    config = load_deploy_file(DEPLOY / "gpu-1x.yaml").config.model_copy(update={"device": "auto"})
    with caplog.at_level(logging.WARNING):
        cpu = config.for_cluster(num_cluster_gpus=0)
    assert cpu.device == "cpu"
    assert all(s.num_gpus == 0 for s in cpu.stages().values())
    assert all(stage_device(s) == "cpu" for s in cpu.stages().values())
    assert "forcing num_gpus=0" in caplog.text


def test_device_cuda_without_gpu_names_the_fix():
    config = load_deploy_file(DEPLOY / "gpu-1x.yaml").config
    with pytest.raises(ValueError, match="device: auto"):
        config.for_cluster(num_cluster_gpus=0)


def test_gpu_cluster_keeps_fractions():
    config = load_deploy_file(DEPLOY / "gpu-1x.yaml").config.for_cluster(num_cluster_gpus=1)
    assert config.device == "cuda"
    assert (config.t3.num_gpus, config.s3gen.num_gpus, config.voice.num_gpus) == (0.4, 0.4, 0.1)
    assert stage_device(config.t3) == "cuda"


@pytest.mark.parametrize("args,match", [
    ({"t3": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}, "not both"),
    ({"t3": {"autoscaling_config": {"min_replicas": 4, "max_replicas": 2}}}, "raise max_replicas"),
    ({"s3gen": {"ray_actor_options": {"num_gpus": 1.5}}}, "fraction"),
    ({"router": {"ray_actor_options": {"num_gpus": 0.1}}}, "router does no model work"),
    ({"router": {"settings": {"max_new_tokens": 0}}}, "router.settings"),
    ({"router": {"settings": {"watermark": False}}}, "top-level"),
    ({"router": {"max_ongoing_requests": 8, "settings": {"max_active_speech_requests": 8}}}, "must be below"),
    ({"t3": {"backend": "engine", "max_ongoing_requests": 4, "user_config": {"max_batch_size": 8}}},
     "raise max_ongoing_requests"),
    ({"device": "tpu"}, "device"),
    ({"t3": {"max_batch": 3}}, "max_batch"),
])
def test_invalid_configs_name_the_fix(args, match):
    with pytest.raises(ValidationError, match=match):
        ServeConfig.model_validate(args)


def test_autoscaling_options():
    config = ServeConfig.model_validate({"router": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                                           "target_ongoing_requests": 8}}})
    opts = config.router.to_options()
    assert opts["num_replicas"] == "auto"
    assert opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["max_queued_requests"] == config.router.max_queued_requests


def test_env_defaults(monkeypatch, tmp_path):
    from serve_app.envs import get_envs

    monkeypatch.setenv("CHATTERBOX_WATERMARK", "false")
    monkeypatch.setenv("CHATTERBOX_API_KEYS", "a, b")
    monkeypatch.setenv("CHATTERBOX_CACHE_DIR", str(tmp_path))
    get_envs.cache_clear()
    try:
        config = ServeConfig().with_env_defaults()
        explicit = ServeConfig(watermark=True, api_keys=[]).with_env_defaults()
    finally:
        get_envs.cache_clear()
    assert config.watermark is False and config.api_keys == ["a", "b"]
    assert config.voice.voices_dir == tmp_path / "voices"
    assert explicit.watermark is True and explicit.api_keys == []


def test_router_settings_from_builder():
    from serve_app.serving.launch.builder import router_settings
    from serve_app.serving.router_settings import RouterSettings

    class Info:
        is_random, source, path, revision, multilingual = True, "random", Path("/x"), None, False

    config = ServeConfig(watermark=False, api_keys=["k"], router={"settings": {"max_new_tokens": 30}})
    settings = RouterSettings(**router_settings(config, Info()))
    assert settings.is_random_weights and not settings.watermark and settings.api_keys == ["k"]
    assert settings.max_new_tokens == 30


class _FakeCheckpoint:
    is_random, source, path, revision, multilingual, preset = True, "random", Path("/ckpt"), None, False, "tiny"

    def describe(self) -> str:
        return "fake checkpoint"


def test_build_app_binds_four_deployments_with_config_options():
    from serve_app.serving.launch.builder import build_app

    config = load_deploy_file(DEPLOY / "gpu-1x.yaml").config.with_env_defaults().for_cluster(num_cluster_gpus=1)
    ingress = build_app(config, checkpoint=_FakeCheckpoint(), resolve=False)._bound_deployment
    assert ingress.name == "SpeechIngress"
    t3_app, s3gen_app, voice_app, settings = ingress.init_args
    assert settings["is_random_weights"] is True and "api_keys" in settings
    deployments = {a._bound_deployment.name: a._bound_deployment for a in (t3_app, s3gen_app, voice_app)}
    assert set(deployments) == {"T3Stage", "S3GenStage", "VoiceStage"}
    t3, s3gen = deployments["T3Stage"], deployments["S3GenStage"]
    assert t3._replica_config.ray_actor_options["num_gpus"] == 0.4
    assert t3._deployment_config.max_queued_requests == config.t3.max_queued_requests
    assert t3._deployment_config.user_config == config.t3.user_config.model_dump()
    assert s3gen._deployment_config.user_config["max_batch_tokens"] == config.s3gen.user_config.max_batch_tokens
    assert ingress._deployment_config.max_queued_requests == config.router.max_queued_requests


@pytest.mark.parametrize("name", ["cpu-tiny", "default", "gpu-1x"])
def test_deploy_files_are_ray_serve_config_files(name):
    """`serve run` / `serve deploy` / KubeRay's serveConfigV2 accept the files as they are."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_app.serving.launch.builder import app_builder

    schema = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / f"{name}.yaml").read_text())) \
        if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(
            yaml.safe_load((DEPLOY / f"{name}.yaml").read_text()))
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert (module, attr) == ("serve_app.serving.launch.builder", "app_builder") and callable(app_builder)
    ServeConfig.model_validate(app.args)


def test_local_ray_gets_enough_logical_cpus_for_the_deploy_file(monkeypatch, caplog):
    """default.yaml reserves 4 CPUs (T3, S3Gen, voices, router): on a 2-core box Ray must still schedule all."""
    from serve_app.serving.launch import run

    config = load_deploy_file(DEPLOY / "default.yaml").config
    assert config.cpus_requested() == 4
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    with caplog.at_level(logging.WARNING):
        assert run.local_num_cpus(config) == 4
    assert "reserves 4 CPUs" in caplog.text
    monkeypatch.setattr(run.os, "cpu_count", lambda: 16)
    assert run.local_num_cpus(config) == 16
    tiny = load_deploy_file(DEPLOY / "cpu-tiny.yaml").config
    assert tiny.cpus_requested() == 1.5 and run.local_num_cpus(tiny) == 16


def test_a_stage_can_set_its_process_environment_through_ray():
    from serve_app.serving.launch.builder import build_app

    config = load_deploy_file(DEPLOY / "gpu-1x.yaml").config.with_env_defaults().for_cluster(num_cluster_gpus=1)
    env = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "60"}
    raw = config.model_dump()
    raw["s3gen"]["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    config = ServeConfig.model_validate(raw)
    ingress = build_app(config, checkpoint=_FakeCheckpoint(), resolve=False)._bound_deployment
    t3_app, s3gen_app, _, _ = ingress.init_args
    s3gen_env = s3gen_app._bound_deployment._replica_config.ray_actor_options["runtime_env"]["env_vars"]
    t3_env = t3_app._bound_deployment._replica_config.ray_actor_options["runtime_env"]["env_vars"]
    assert s3gen_env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "60" and s3gen_env["TQDM_DISABLE"] == "1"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in t3_env
    with pytest.raises(ValidationError):   # only env_vars: the rest of a runtime env belongs to the app
        ServeConfig.model_validate({"s3gen": {"ray_actor_options": {"runtime_env": {"pip": ["numpy"]}}}})


def _gpu1x_raw() -> dict:
    import yaml

    return yaml.safe_load((DEPLOY / "gpu-1x.yaml").read_text())


def _write(tmp_path: Path, raw: dict) -> Path:
    import yaml

    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_s3gen_user_config_lives_in_deployments_and_is_validated_there(tmp_path):
    """The deploy files keep S3Gen's user_config in the application's `deployments:` list; the loader validates it
    as the stage's and refuses it in two places, a bad key, and T3's (its max_batch_size sizes the KV cache)."""
    raw = _gpu1x_raw()
    app = raw["applications"][0]
    assert "user_config" not in app["args"]["s3gen"]
    entry = next(d for d in app["deployments"] if d["name"] == "S3GenStage")
    config = load_deploy_file(DEPLOY / "gpu-1x.yaml").config
    assert config.s3gen.user_config.model_dump(exclude_unset=True) == entry["user_config"]

    app["args"]["s3gen"]["user_config"] = {"max_batch_tokens": 100}
    with pytest.raises(ValueError, match="under both args.s3gen and the deployments entry 'S3GenStage'"):
        load_deploy_file(_write(tmp_path, raw))
    del app["args"]["s3gen"]["user_config"]
    entry["user_config"]["no_such_knob"] = 1
    with pytest.raises(ValidationError, match="no_such_knob"):
        load_deploy_file(_write(tmp_path, raw))
    del entry["user_config"]["no_such_knob"]
    app["deployments"].append({"name": "T3Stage", "user_config": {"max_batch_size": 8}})
    with pytest.raises(ValueError, match="keep it under args.t3.user_config"):
        load_deploy_file(_write(tmp_path, raw))


def test_a_new_s3gen_user_config_is_an_in_place_update_to_serve():
    """What Serve restarts replicas for: the application's code version (ray's get_app_code_version, used when a
    config is deployed: `serve deploy`, KubeRay). A new S3Gen user_config in `deployments:` leaves it as it was,
    so Serve only calls each replica's reconfigure; the same change under `args` would restart every replica."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    def code_version(raw: dict) -> str:
        return get_app_code_version(ServeDeploySchema.model_validate(raw).applications[0])

    raw = _gpu1x_raw()
    tuned = _gpu1x_raw()
    next(d for d in tuned["applications"][0]["deployments"] if d["name"] == "S3GenStage")["user_config"][
        "first_step_cover"] = 1.0
    assert code_version(tuned) == code_version(raw)
    in_args = _gpu1x_raw()
    in_args["applications"][0]["args"]["s3gen"]["deliver_per_call"] = False
    assert code_version(in_args) != code_version(raw)


@pytest.mark.parametrize("name", ["cpu-tiny", "default", "gpu-1x"])
def test_to_deploy_file_is_load_deploy_files_inverse(name, tmp_path):
    """What `chatterbox-serve serve` deploys through Serve's config path (to_deploy_file) validates with Ray's own
    schema and loads back as the same config, S3Gen's user_config in its deployments entry."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_app.serving.config import to_deploy_file

    config = load_deploy_file(DEPLOY / f"{name}.yaml").config
    raw = to_deploy_file(config, "127.0.0.1", 8123)
    ServeDeploySchema.model_validate(raw)
    app = raw["applications"][0]
    assert "user_config" not in app["args"]["s3gen"] and app["deployments"][0]["name"] == "S3GenStage"
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))
    back = load_deploy_file(path)
    assert back.config == config and (back.host, back.port) == ("127.0.0.1", 8123)


def test_serve_watch_deploys_the_file_again_when_it_changes(tmp_path, monkeypatch, caplog):
    """`chatterbox-serve serve --watch`: a changed deploy file is deployed again (the CLI's checkpoint kept); an
    unchanged one is not; one that does not validate is logged and the app keeps serving the last good one."""
    import yaml

    from serve_app.serving.launch import run

    deployed = []
    monkeypatch.setattr(run, "_deploy", lambda client, config, host, port, wait: deployed.append((config, wait)))
    raw = yaml.safe_load((DEPLOY / "cpu-tiny.yaml").read_text())
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))
    started = load_deploy_file(path).config
    started = started.model_copy(update={"checkpoint": started.checkpoint.model_copy(update={"source": "/ckpt"})})
    watcher = run._Watcher(object(), path, started, "127.0.0.1", 8000)
    watcher()
    assert deployed == []
    raw["applications"][0]["deployments"][0]["user_config"]["max_batch_tokens"] = 96
    path.write_text(yaml.safe_dump(raw))
    watcher()
    watcher()
    assert len(deployed) == 1 and deployed[0][0].s3gen.user_config.max_batch_tokens == 96
    assert deployed[0][0].checkpoint.source == "/ckpt" and deployed[0][1] is False   # never blocks the loop
    raw["applications"][0]["deployments"][0]["user_config"]["no_such_knob"] = 1
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.ERROR):
        watcher()
        path.write_text("applications: [{name: chatterbox")   # a half-written file
        watcher()
    assert len(deployed) == 1 and caplog.text.count("does not validate") == 2

    def refused(*_):
        raise RuntimeError("the controller said no")

    monkeypatch.setattr(run, "_deploy", refused)
    del raw["applications"][0]["deployments"][0]["user_config"]["no_such_knob"]
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.ERROR):
        watcher()   # logged, not raised: the CLI keeps serving
    assert "deploying" in caplog.text and "failed" in caplog.text
