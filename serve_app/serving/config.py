"""The serve config: what `deploy/*.yaml` holds under `applications[0].args`, validated once.

A deploy file is an ordinary Ray Serve config file (usable with `serve run deploy/cpu-tiny.yaml`, `serve deploy`
and KubeRay's `serveConfigV2`); its application's `args` is a `ServeConfig`. Every per-deployment knob Ray
Serve has for our stages (replicas or autoscaling, actor resources, admission limits, `user_config`) lives
here, so the YAML is the single source of truth and is checked before anything starts.

S3Gen's `user_config` (its vocoder scheduler's knobs) lives in the application's `deployments:` list instead,
where Serve applies a change through the replica's `reconfigure` without restarting it (`serve deploy`, KubeRay's
serveConfigV2); anything under `args`, T3's user_config included, is part of the app's code version to Serve, so
changing it restarts every replica.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["upstream", "engine"]
DType = Literal["float32", "float16", "bfloat16"]

APP_IMPORT_PATH = "serve_app.serving.launch.builder:app_builder"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckpointSettings(_Model):
    source: str | None = Field(
        None, description="Local folder in the upstream layout, 'hub', 'random', or null: CHATTERBOX_CHECKPOINT, "
        "else hub if reachable, else random weights.")
    preset: Literal["full", "tiny"] = Field("full", description="Architecture of a random-weight checkpoint.")
    multilingual: bool = False
    allow_random: bool = Field(True, description="Fall back to random weights when the hub is unreachable.")


class AutoscalingSettings(_Model):
    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling_config: min_replicas={self.min_replicas} exceeds max_replicas="
                             f"{self.max_replicas}; raise max_replicas or lower min_replicas")
        return self


class RuntimeEnv(_Model):
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the replica's process, "
                                     "set before CUDA starts: e.g. CUDA_MPS_ACTIVE_THREAD_PERCENTAGE caps the "
                                     "share of SMs a stage's kernels may use under CUDA MPS.")


class ActorOptions(_Model):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    runtime_env: RuntimeEnv | None = None

    @field_validator("num_gpus")
    @classmethod
    def _gpu_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"num_gpus={v}: a replica uses a fraction of one GPU (<= 1) or whole GPUs; "
                             "use e.g. 0.4 or 1")
        return v


class DeploymentSettings(_Model):
    """Ray Serve deployment options common to every stage."""

    num_replicas: int | None = Field(1, ge=1, description="Fixed replica count; null when autoscaling.")
    autoscaling_config: AutoscalingSettings | None = None
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one replica runs at once.")
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting for a replica before callers get a BackPressureError (-1: no cap).")
    health_check_period_s: float = Field(
        2.0, gt=0, description="How often Serve checks each replica: a replica that died is replaced after at most "
        "this long (Ray's default, 10 s, made recovery from a crash 10 s slower; the check is cheap).")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _autoscaling_xor_replicas(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("autoscaling_config") is not None:
            if data.get("num_replicas") not in (None, "auto"):
                raise ValueError("set either num_replicas or autoscaling_config, not both; remove num_replicas "
                                 "to autoscale")
            data = {**data, "num_replicas": None}
        return data

    @property
    def num_gpus(self) -> float:
        return self.ray_actor_options.num_gpus

    def to_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        opts: dict[str, Any] = dict(
            ray_actor_options=self.ray_actor_options.model_dump(exclude_none=True),
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            health_check_period_s=self.health_check_period_s,
            graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
        )
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
            opts["num_replicas"] = "auto"
        else:
            opts["num_replicas"] = self.num_replicas
        return opts

    def without_gpu(self) -> DeploymentSettings:
        return self.model_copy(update={"ray_actor_options": self.ray_actor_options.model_copy(update={"num_gpus": 0})})


class T3UserConfig(_Model):
    max_batch_size: int = Field(8, ge=1, description="Requests decoded together (engine) or gathered per batch.")


class S3GenUserConfig(_Model):
    max_batch_tokens: int = Field(4096, ge=1, description="New speech tokens vocoded in one engine step, over "
                                  "all of the replica's streams (the most urgent go first).")
    max_stream_batch_tokens: int | None = Field(None, ge=1, description="Of those, streaming rows' new tokens "
                                                "per step (None: max_batch_tokens). Lower keeps steps short, so "
                                                "listeners wait less between blocks; the less urgent streams go "
                                                "next step, with more tokens each.")
    first_steps_alone: bool = Field(False, description="Streams' first steps (time to first audio) run in a step "
                                    "of their own whenever any is ready, ahead of and apart from the others' "
                                    "steps, which then wait that much longer.")
    deadline_steps: bool = Field(False, description="A stream with audio in hand is left to the next step when "
                                 "taking it would make the step (estimated from the last steps) outlast the audio "
                                 "of a stream already in it. deploy/gpu-1x.yaml turns it on (stall-free streams "
                                 "at 32: 90% against 32% in the same device call).")
    light_first_step_tokens: int | None = Field(None, ge=1, description="A text chunk that arrives while at most "
                                                "light_load_streams other streams are open gets a first step of "
                                                "this many tokens instead of the router's first_chunk_tokens: "
                                                "sooner first audio where T3 and the vocoder have time to spare.")
    light_load_streams: int = Field(0, ge=0, description="See light_first_step_tokens. 0: only a replica with no "
                                    "other stream open (a burst's first arrivals would otherwise all get short "
                                    "first steps just before the load comes).")
    first_step_cover: float | None = Field(None, gt=0, description="Grow a text chunk's first step beyond the "
                                           "router's first_chunk_tokens so its audio lasts this many times the "
                                           "expected wait for the second step's audio (T3's next block at its "
                                           "observed pace, then two steps at their observed length). None: off. "
                                           "deploy/gpu-1x.yaml sets 1.5 (stall-free streams at 64: 72% against "
                                           "21%, same throughput, later first audio).")
    max_first_step_tokens: int = Field(50, ge=1, description="The most first_step_cover grows a first step to.")
    first_step_predict: bool = Field(False, description="With first_step_cover, also cover two steps of the length "
                                     "predicted for the streams open now (each row's overhead plus the audio a "
                                     "step plays, at the observed seconds per flow token), and hold a first step "
                                     "until it does: a burst on an idle replica otherwise gets first steps sized "
                                     "from the light steps before it. In the served runs the stalls matched each "
                                     "level's opening burst (bench/README.md). deploy/gpu-1x.yaml sets it: 99.8% "
                                     "against 74.5% stall-free at 128 streams, with urgent_steps 3 "
                                     "(bench/results/bench_system_predict_urgent3.md against "
                                     "bench_system_8ba91dc.md). A first step made light on an idle "
                                     "replica is not held.")
    max_step_tokens: int = Field(200, ge=1, description="A stream's later steps grow (doubling) up to this many "
                                 "new tokens: fewer, larger steps cost less flow context and batch better.")
    min_step_tokens: int = Field(8, ge=1, description="A stream whose listener runs low steps early, with at "
                                 "least this many new tokens.")
    low_water_s: float = Field(1.0, ge=0, description="A stream steps early when less than this much audio is "
                               "left to play (at real time since its first block).")
    urgent_steps: float | None = Field(None, gt=0, description="A stream steps early only when its audio left "
                                       "lasts at most this many steps (the longest of the last 16): it steps just in "
                                       "time, with every token T3 made by then, instead of at once with "
                                       "min_step_tokens. Where steps are long this is low_water_s as before. "
                                       "None: off. deploy/gpu-1x.yaml sets 3: 1.11 against 1.22 tokens vocoded "
                                       "per token made at one stream (bench/results/bench_system_predict_urgent3.md against "
                                       "bench_system_8ba91dc.md)."
                                       " It replaced urgent_margin (a multiple of the expected wait for a step at "
                                       "the target), which changed nothing served (bench_system_urgent2.md).")


class T3Settings(DeploymentSettings):
    backend: Backend = "engine"
    dtype: DType = "float32"
    user_config: T3UserConfig = Field(default_factory=T3UserConfig)
    engine: dict[str, Any] = Field(default_factory=dict, description="Extra T3EngineConfig fields (engine backend).")
    max_cached_voices: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _admission(self) -> T3Settings:
        if self.backend == "engine" and self.max_ongoing_requests < self.user_config.max_batch_size:
            raise ValueError(f"t3.max_ongoing_requests={self.max_ongoing_requests} is below user_config."
                             f"max_batch_size={self.user_config.max_batch_size}: the engine could never fill a "
                             "batch; raise max_ongoing_requests")
        return self


class S3GenSettings(DeploymentSettings):
    backend: Backend = "engine"
    dtype: DType = "float32"
    user_config: S3GenUserConfig = Field(default_factory=S3GenUserConfig)
    engine: dict[str, Any] = Field(default_factory=dict, description="Extra S3GenEngineConfig fields.")
    max_cached_voices: int = Field(64, ge=1)
    warmup_batch_sizes: list[int] = Field(
        [1, 4], description="GPU engine replicas capture the first streamed chunk's CUDA graphs for these numbers "
        "of concurrent new streams at start (built-in voice); [] skips the warm-up.")
    warmup_first_chunk_tokens: int = Field(25, ge=1, description="Keep equal to the router's first_chunk_tokens.")
    warmup_graph_tokens: int = Field(0, ge=0, description="GPU engine replicas capture the flow's CUDA graphs of "
                                     "every batch bucket and length bucket up to this many tokens (voice prompt "
                                     "included) at start, so serving never pauses to capture; 0 skips it.")
    warmup_graph_frames: int = Field(0, ge=0, description="The same for HiFT, up to this many mel frames a row.")
    deliver_per_call: bool = Field(False, description="Hand each flow call's audio to its streams as soon as that "
                                   "call is vocoded, the step's calls in the order of their most urgent row, not "
                                   "all at the step's end: a first step's audio need not wait for the step's other "
                                   "rows (engine backend). deploy/gpu-1x.yaml turns it on: first audio's vocode "
                                   "phase 0.26 against 0.40 s at 64 streams (bench/results/bench_system_dpc_on.md "
                                   "against bench_system_dpc_base.md).")


class VoiceSettings(DeploymentSettings):
    backend: Backend = "engine"
    voices_dir: Path | None = Field(None, description="Where enrolled voices live (null: CHATTERBOX_VOICES_DIR, "
                                    "else <cache_dir>/voices).")
    max_cached_voices: int = Field(256, ge=1)
    max_reference_s: float = Field(30.0, gt=0, description="Longest reference clip accepted for enrollment.")


class RouterSettings(DeploymentSettings):
    settings: dict[str, Any] = Field(default_factory=dict, description="Passed to SpeechRouter as keyword "
                                     "arguments (text chunking, limits, stream options).")
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(128, ge=-1)


class ServeConfig(_Model):
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    device: Device = Field("auto", description="'auto': CUDA where the cluster has GPUs, else CPU.")
    quantization: str | None = Field(None, description="Strategy for GPU stages, e.g. 'mixed' or 'mixed,t3=int8' "
                                     "(null: CHATTERBOX_QUANTIZATION).")
    watermark: bool | None = Field(None, description="Perth watermark on generated audio (null: CHATTERBOX_WATERMARK).")
    api_keys: list[str] | None = Field(None, description="Bearer keys; null: CHATTERBOX_API_KEYS; [] = no auth.")
    app_name: str = "chatterbox"
    route_prefix: str = "/"
    t3: T3Settings = Field(default_factory=lambda: T3Settings(ray_actor_options=ActorOptions(num_cpus=1, num_gpus=0.4)))
    s3gen: S3GenSettings = Field(
        default_factory=lambda: S3GenSettings(ray_actor_options=ActorOptions(num_cpus=1, num_gpus=0.4)))
    voice: VoiceSettings = Field(default_factory=lambda: VoiceSettings(
        ray_actor_options=ActorOptions(num_cpus=1, num_gpus=0.1), max_ongoing_requests=4))
    router: RouterSettings = Field(default_factory=lambda: RouterSettings(ray_actor_options=ActorOptions(num_cpus=1)))

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix={v!r} must start with '/', e.g. '/' or '/tts'")
        return v

    @model_validator(mode="after")
    def _router(self) -> ServeConfig:
        if self.router.num_gpus:
            raise ValueError("router.ray_actor_options.num_gpus must be 0: the router does no model work")
        from serve_app.serving.router_settings import RouterSettings

        reserved = {"is_random_weights", "checkpoint_source", "multilingual", "watermark", "api_keys"}
        if reserved & set(self.router.settings):
            raise ValueError(f"router.settings may not set {sorted(reserved & set(self.router.settings))}: they "
                             "come from the checkpoint and the top-level watermark/api_keys fields")
        try:
            settings = RouterSettings(**self.router.settings)
        except ValueError as e:
            raise ValueError(f"router.settings: {e}") from None
        if settings.max_active_speech_requests >= self.router.max_ongoing_requests:
            raise ValueError(
                f"router.settings.max_active_speech_requests={settings.max_active_speech_requests} must be below "
                f"router.max_ongoing_requests={self.router.max_ongoing_requests}: past the deployment's limit Ray's "
                "proxy queues requests and answers plain-text 503s instead of the app's OpenAI-shaped 429")
        return self

    # -- resolution against the environment and the cluster --------------------------------------------

    def with_env_defaults(self) -> ServeConfig:
        """Fill null fields from CHATTERBOX_* env vars (explicit YAML values win)."""
        from serve_app.envs import get_envs

        envs = get_envs()
        update: dict[str, Any] = {}
        if self.checkpoint.source is None and envs.checkpoint:
            update["checkpoint"] = self.checkpoint.model_copy(update={"source": envs.checkpoint})
        if self.quantization is None and envs.quantization:
            update["quantization"] = envs.quantization
        if self.watermark is None:
            update["watermark"] = envs.watermark
        if self.api_keys is None:
            update["api_keys"] = [k.strip() for k in (envs.api_keys or "").split(",") if k.strip()]
        if self.voice.voices_dir is None:
            voices_dir = envs.voices_dir or (Path(envs.cache_dir) / "voices")
            update["voice"] = self.voice.model_copy(update={"voices_dir": Path(voices_dir)})
        return self.model_copy(update=update)

    def for_cluster(self, num_cluster_gpus: float) -> ServeConfig:
        """Apply the device choice: without GPUs (or device=cpu) every stage asks for 0 GPUs, with a warning,
        so no replica waits forever for a GPU that is not there."""
        gpu_stages = {n: s for n, s in self.stages().items() if s.num_gpus > 0}
        if self.device == "cuda" and num_cluster_gpus <= 0:
            raise ValueError("device=cuda but the Ray cluster has no GPUs; use device: auto (falls back to CPU) "
                             "or device: cpu")
        if self.device == "cpu" or num_cluster_gpus <= 0:
            if gpu_stages:
                log.warning("%s: forcing num_gpus=0 for %s (asked for %s); stages run on CPU",
                            "device=cpu" if self.device == "cpu" else "no GPU in the Ray cluster",
                            ", ".join(gpu_stages), ", ".join(f"{n}={s.num_gpus}" for n, s in gpu_stages.items()))
            return self.model_copy(update={n: s.without_gpu() for n, s in gpu_stages.items()} | {"device": "cpu"})
        if self.device == "cuda" and not gpu_stages:
            raise ValueError("device=cuda but no stage asks for a GPU; set ray_actor_options.num_gpus on t3/s3gen "
                             "(e.g. 0.4) or use device: auto")
        return self.model_copy(update={"device": "cuda" if gpu_stages else "cpu"})

    def stages(self) -> dict[str, DeploymentSettings]:
        return {"t3": self.t3, "s3gen": self.s3gen, "voice": self.voice}

    def cpus_requested(self) -> float:
        """Logical CPUs the app's replicas reserve at their initial/minimum count (model stages and router)."""
        total = 0.0
        for s in (*self.stages().values(), self.router):
            n = s.num_replicas if s.autoscaling_config is None else max(1, s.autoscaling_config.min_replicas)
            total += (n or 1) * s.ray_actor_options.num_cpus
        return total


def stage_device(settings: DeploymentSettings) -> str:
    """The torch device a stage's replicas use: CUDA exactly when the replica was given a GPU share."""
    return "cuda" if settings.num_gpus > 0 else "cpu"


# -- deploy files -----------------------------------------------------------------------------------------


class DeployFile(_Model):
    """The parts of a Ray Serve config file we read; the rest is passed through to Ray untouched."""

    model_config = ConfigDict(extra="allow", frozen=True)
    host: str = "127.0.0.1"
    port: int = 8000
    config: ServeConfig


# Deployments whose `user_config` may live in the application's `deployments:` list, Serve's own place for it.
# Serve hashes an application's `args` into its code version: a change there restarts every replica, while a
# `deployments:` entry's user_config is a lightweight update (each replica's `reconfigure`, no restart).
# T3's user_config is not among them: its max_batch_size sizes the KV cache when a replica starts.
IN_PLACE_USER_CONFIGS = {"S3GenStage": "s3gen"}


def _args_with_deployment_user_configs(app: dict, path: Path) -> dict:
    """The application's args with each `deployments:` entry's user_config moved in below its stage, so that one
    ServeConfig validates (and the CLI builds) what Serve will run. A user_config in both places is an error."""
    args = dict(app.get("args") or {})
    for entry in app.get("deployments") or []:
        name = entry.get("name")
        if "user_config" not in entry:
            continue
        stage = IN_PLACE_USER_CONFIGS.get(name)
        if stage is None:
            raise ValueError(f"{path}: deployments entry {name!r} has a user_config; only "
                             f"{', '.join(IN_PLACE_USER_CONFIGS)} takes one there (T3Stage's max_batch_size sizes "
                             "the KV cache at start: keep it under args.t3.user_config)")
        settings = dict(args.get(stage) or {})
        if "user_config" in settings:
            raise ValueError(f"{path}: {stage}'s user_config is under both args.{stage} and the deployments entry "
                             f"{name!r}; keep it in the deployments entry (applied without restarting replicas)")
        args[stage] = {**settings, "user_config": entry["user_config"]}
    return args


def to_deploy_file(config: ServeConfig, host: str, port: int) -> dict:
    """The Ray Serve config file (a ServeDeploySchema mapping) that deploys `config`, load_deploy_file's inverse:
    its args, with the user_config of IN_PLACE_USER_CONFIGS' stages in the application's `deployments:` list."""
    args = config.model_dump(mode="json")
    deployments = [{"name": name, "user_config": args[stage].pop("user_config")}
                   for name, stage in IN_PLACE_USER_CONFIGS.items()]
    app = {"name": config.app_name, "route_prefix": config.route_prefix, "import_path": APP_IMPORT_PATH,
           "args": args, "deployments": deployments}
    return {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": [app]}


def load_deploy_file(path: str | Path) -> DeployFile:
    """Read a Ray Serve config file whose (single) application is ours and validate its args (with the
    user_config of its `deployments:` entries, IN_PLACE_USER_CONFIGS)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"serve config {path} not found; pass one of deploy/*.yaml") from None
    if not isinstance(raw, dict) or not raw.get("applications"):
        raise ValueError(f"{path}: not a Ray Serve config file (no 'applications' list); see deploy/default.yaml")
    apps = [a for a in raw["applications"] if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected exactly one application with import_path: {APP_IMPORT_PATH}")
    app = apps[0]
    http = raw.get("http_options") or {}
    args = _args_with_deployment_user_configs(app, path)
    args.setdefault("app_name", app.get("name", "chatterbox"))
    args.setdefault("route_prefix", app.get("route_prefix", "/"))
    return DeployFile(host=http.get("host", "127.0.0.1"), port=int(http.get("port", 8000)),
                      config=ServeConfig.model_validate(args))
