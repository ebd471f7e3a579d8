"""Where weights come from, and loading each component through the real code paths.

Sources, in order: a local folder in the upstream layout (CHATTERBOX_CHECKPOINT=/path), the Hugging Face hub
(CHATTERBOX_CHECKPOINT=hub, or unset and the hub reachable), or - only when neither is available - a
random-weight checkpoint written once into the cache and announced loudly (log banner, /v1/models, a response
header). Components load separately so a vocoder replica never holds T3, and vice versa.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from .layout import HUB_REPO_ID, HUB_REVISION, RANDOM_MARKER, Layout, layout_for
from .presets import build_s3gen, build_t3, build_voice_encoder, get_preset, preset_from_s3gen_state, preset_from_t3_state

log = logging.getLogger(__name__)

Source = Literal["hub", "local", "random"]


class CheckpointError(RuntimeError):
    """A checkpoint can't be found or doesn't match the upstream layout."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    source: Source
    multilingual: bool
    is_random: bool
    preset: str                 # "full" for real weights
    revision: str | None = None  # hub revision asked for

    @property
    def layout(self) -> Layout:
        return layout_for(self.multilingual)

    def describe(self) -> str:
        kind = f"RANDOM WEIGHTS ({self.preset} preset)" if self.is_random else "trained weights"
        return f"{kind} from {self.source}: {self.path}"


def _local_info(path: Path, source: Source, multilingual: bool | None, revision: str | None = None) -> CheckpointInfo:
    if multilingual is None:
        multilingual = (path / layout_for(True).t3).exists() and not (path / layout_for(False).t3).exists()
    layout = layout_for(multilingual)
    missing = [f for f in layout.files[:4] if not (path / f).exists()]
    if missing:
        raise CheckpointError(
            f"{path} is not a chatterbox checkpoint: missing {missing}. Expected the upstream layout "
            f"{list(layout.files)}; write a random one with `chatterbox-serve make-checkpoint {path}`."
        )
    marker = path / RANDOM_MARKER
    meta = json.loads(marker.read_text()) if marker.exists() else {}
    return CheckpointInfo(path=path, source=source, multilingual=multilingual, is_random=bool(meta),
                          preset=meta.get("preset", "full"), revision=revision)


def download_from_hub(multilingual: bool = False, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Fetch the upstream files from the hub (progress bars from huggingface_hub). Raises when unreachable."""
    from huggingface_hub import snapshot_download

    layout = layout_for(multilingual)
    return Path(snapshot_download(repo_id=HUB_REPO_ID, revision=revision or HUB_REVISION,
                                  allow_patterns=list(layout.files), cache_dir=cache_dir))


def resolve_checkpoint(
    source: str | None = None,
    *,
    preset: str = "full",
    multilingual: bool = False,
    allow_random: bool = True,
    cache_dir: Path | None = None,
    revision: str | None = None,
) -> CheckpointInfo:
    """source: a folder, 'hub', 'random', or None (hub if reachable, else random if allowed)."""
    from serve_app.envs import get_envs

    envs = get_envs()
    cache_dir = Path(cache_dir or envs.cache_dir)
    revision = revision or envs.hub_revision
    if source not in (None, "hub", "random"):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder {path} does not exist; set CHATTERBOX_CHECKPOINT to a folder "
                                  f"in the upstream layout, 'hub', or leave it unset")
        return _local_info(path, "local", None)
    if source in (None, "hub"):
        try:
            path = download_from_hub(multilingual, revision)
            log.info("weights: %s@%s from the hub at %s", HUB_REPO_ID, revision or HUB_REVISION, path)
            return _local_info(path, "hub", multilingual, revision or HUB_REVISION)
        except Exception as e:  # offline, gated, rate-limited: all mean "not from the hub"
            if source == "hub" or not allow_random:
                raise CheckpointError(f"could not download {HUB_REPO_ID} from the Hugging Face hub: {e}") from e
            log.warning("hub unreachable (%s: %s); falling back to random weights", type(e).__name__, str(e)[:200])
    from .checkpoint import write_random_checkpoint

    path = cache_dir / "checkpoints" / f"random-{preset}{'-multilingual' if multilingual else ''}"
    write_random_checkpoint(path, preset=preset, multilingual=multilingual)
    info = _local_info(path, "random", multilingual)
    announce_random(info)
    return info


def announce_random(info: CheckpointInfo) -> None:
    if not info.is_random:
        return
    bar = "!" * 78
    log.warning("\n%s\n!! RANDOM WEIGHTS: no trained checkpoint was found (hub unreachable, none configured).\n"
                "!! The service runs every real code path but produces NOISE, not speech.\n"
                "!! Set CHATTERBOX_CHECKPOINT=/path/to/checkpoint (upstream layout) or make the hub reachable.\n"
                "!! Using: %s\n%s", bar, info.describe(), bar)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device: %s (auto: CUDA %s)", dev, "available" if dev.type == "cuda" else "not available")
        return dev
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} asked for but CUDA is not available; use device 'auto' or 'cpu'")
    return dev


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_t3(info: CheckpointInfo, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Upstream T3 with the checkpoint's weights; the preset is read off the tensor shapes."""
    state = _load_state(info.path / info.layout.t3)
    if "model" in state:  # upstream tolerates a wrapped state dict
        state = state["model"][0]
    preset, multilingual = preset_from_t3_state(state)
    t3 = build_t3(preset, multilingual)
    t3.load_state_dict(state)
    return t3.to(device=device, dtype=dtype).eval()


def load_s3gen(info: CheckpointInfo, device: str | torch.device = "cpu", *, enrollment: bool = True):
    """Upstream S3Gen (flow + HiFT, and with `enrollment` the S3 tokenizer and CAMPPlus)."""
    state = _load_state(info.path / info.layout.s3gen)
    dims = preset_from_s3gen_state(state)
    preset = next((p for p in map(get_preset, ("full", "tiny")) if p.s3gen == dims), None)
    if preset is None:
        raise CheckpointError(f"S3Gen checkpoint dimensions {dims} match no preset")
    s3gen = build_s3gen(preset)
    # strict=False as upstream: the tokenizer's mel filters and window are rebuilt, not stored
    missing, unexpected = s3gen.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.startswith(("tokenizer._mel_filters", "tokenizer.window"))]
    if real_missing or unexpected:
        raise CheckpointError(f"S3Gen checkpoint mismatch: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
    if not enrollment:
        from serve_app.model.strip import strip_enrollment_modules

        strip_enrollment_modules(s3gen)
    return s3gen.to(device).eval()


def load_voice_encoder(info: CheckpointInfo, device: str | torch.device = "cpu"):
    ve = build_voice_encoder()
    ve.load_state_dict(_load_state(info.path / info.layout.ve))
    return ve.to(device).eval()


def load_text_tokenizer(info: CheckpointInfo):
    from chatterbox.models.tokenizers import EnTokenizer, MTLTokenizer

    if not info.multilingual:
        return EnTokenizer(str(info.path / info.layout.tokenizer))
    # Upstream's Chinese (Cangjie) table is fetched with hf_hub_download, even beside a local checkpoint, with
    # retries that stall offline start-up. Point it at the checkpoint's own copy when there is one.
    import chatterbox.models.tokenizers.tokenizer as upstream_tok

    local = info.path / "Cangjie5_TC.json"
    original = upstream_tok.hf_hub_download
    if local.exists():
        upstream_tok.hf_hub_download = lambda *a, **k: str(local)
    try:
        return MTLTokenizer(str(info.path / info.layout.tokenizer))
    finally:
        upstream_tok.hf_hub_download = original


def load_builtin_conds(info: CheckpointInfo, device: str | torch.device = "cpu"):
    """The built-in voice (upstream `Conditionals`), or None when the checkpoint has no conds.pt."""
    from chatterbox.tts import Conditionals

    path = info.path / info.layout.conds
    return Conditionals.load(path, map_location="cpu").to(device) if path.exists() else None


def load_upstream_tts(info: CheckpointInfo, device: str | torch.device = "cpu", watermark: bool = True):
    """The upstream ChatterboxTTS / ChatterboxMultilingualTTS object, assembled from our component loaders."""
    device = str(device)
    if info.multilingual:
        from chatterbox.mtl_tts import ChatterboxMultilingualTTS as cls
    else:
        from chatterbox.tts import ChatterboxTTS as cls
    tts = cls(load_t3(info, device), load_s3gen(info, device), load_voice_encoder(info, device),
              load_text_tokenizer(info), device, conds=load_builtin_conds(info, device))
    if not watermark:
        tts.watermarker = _NoWatermark()
    return tts


class _NoWatermark:
    def apply_watermark(self, wav, sample_rate):  # same signature as perth's watermarkers
        return wav
