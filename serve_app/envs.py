"""Every CHATTERBOX_* environment variable, declared once, typed and documented.

Call sites do `from serve_app.envs import get_envs` and read attributes; nothing else reads os.environ for
CHATTERBOX_* settings. Below them: the one variable of Ray's that this project sets (`ray_process_env`).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Envs(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATTERBOX_", extra="ignore")

    checkpoint: str | None = Field(
        None,
        description="Where weights come from: a local folder in the upstream layout, 'hub' (ResembleAI/chatterbox "
        "at the pinned revision), or unset (hub if reachable, else a random-weight checkpoint, announced loudly).",
    )
    preset: str = Field("full", description="Architecture of a random-weight checkpoint: 'full' or 'tiny'.")
    multilingual: bool = Field(False, description="Use the multilingual model (23 languages).")
    hub_revision: str | None = Field(None, description="Override the pinned Hugging Face revision.")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "chatterbox-serve",
        description="Where random-weight checkpoints and pre-quantized weights are written.",
    )
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'.")
    quantization: str | None = Field(
        None, description="Quantization strategy, e.g. 'mixed' or 'mixed,t3=int8' (see `chatterbox-serve quant`)."
    )
    watermark: bool = Field(True, description="Apply the Perth watermark to generated audio, as upstream does.")
    api_keys: str | None = Field(None, description="Comma-separated Bearer API keys; unset means no auth.")
    voices_dir: Path | None = Field(None, description="Where enrolled voices are stored (default: cache_dir/voices).")
    log_level: str = Field("INFO", description="Python log level.")
    profile_dir: Path | None = Field(None, description="Diagnostics: a stage replica with this set records one "
                                     "torch.profiler window over its engine steps into this folder "
                                     "(serving/stages/step_profiler.py). Unset: off.")
    profile_steps: int = Field(50, ge=1, description="Steps in that window.")
    profile_min_batch: int = Field(1, ge=1, description="The window opens at the first step with at least this "
                                   "many rows (T3: requests, S3Gen: streams).")
    metrics_port: int = Field(8080, description="Port of Ray's Prometheus metrics endpoint when `serve` starts Ray "
                              "(outside Ray's worker port range 10002-19999).")


@lru_cache(maxsize=1)
def get_envs() -> Envs:
    return Envs()


# -- Ray's own variables that this project sets --------------------------------------------------------------------

RAY_PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_MIDDLEWARES_IMPORT_PATH = "serve_app.serving.api.proxy_middleware:proxy_middlewares"


def ray_process_env() -> dict[str, str]:
    """What every Ray process of this project needs in its environment: Ray Serve's HTTP proxy reads
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH when it starts and wraps itself in the middlewares that function
    returns (api/proxy_middleware.py: a request whose router replica died is retried, or answered with an
    OpenAI-shaped 503 instead of uvicorn's plain-text 500). Set on `ray start` (launch/local_ray.py) and on the
    k8s pods (k8s/render.py); Ray's processes inherit it from the raylet."""
    return {RAY_PROXY_CALLBACK_ENV: PROXY_MIDDLEWARES_IMPORT_PATH}
