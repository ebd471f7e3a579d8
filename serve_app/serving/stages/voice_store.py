"""Enrolled voices on disk: `<voices_dir>/<voice_id>/conds.pt` (upstream `Conditionals.save` format, so a
folder can be copied into upstream's `ChatterboxTTS.conds` as is) and `meta.json` (name, created_at,
duration_s). The checkpoint's own `conds.pt` is the built-in voice `default`, never written or deleted.

Writes go to a temporary folder that is renamed into place, so replicas sharing the folder never read a
half-written voice. Also the conversions between upstream `Conditionals` and the handle-safe `VoiceConds`.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve_app.contracts import BUILTIN_VOICE, VoiceConds, VoiceInfo
from serve_app.serving.errors import InvalidRequestError, VoiceNotFoundError

log = logging.getLogger(__name__)

CONDS_FILE = "conds.pt"
META_FILE = "meta.json"


def conditionals_to_voice_conds(conds: Any) -> VoiceConds:
    """Upstream `Conditionals` (torch) -> `VoiceConds` (numpy, crosses handles)."""
    t3, gen = conds.t3, conds.gen

    def np_(x: Any, dtype) -> np.ndarray:
        return torch.as_tensor(x).detach().cpu().numpy().astype(dtype, copy=False)

    emotion = t3.emotion_adv
    return VoiceConds(
        t3_speaker_emb=np_(t3.speaker_emb, np.float32).reshape(1, -1),
        t3_cond_prompt_speech_tokens=np_(t3.cond_prompt_speech_tokens, np.int64).reshape(1, -1),
        t3_emotion_adv=float(torch.as_tensor(emotion).reshape(-1)[0]) if emotion is not None else 0.5,
        gen_prompt_token=np_(gen["prompt_token"], np.int64).reshape(1, -1),
        gen_prompt_token_len=np_(gen["prompt_token_len"], np.int64).reshape(1),
        gen_prompt_feat=np_(gen["prompt_feat"], np.float32),
        gen_embedding=np_(gen["embedding"], np.float32).reshape(1, -1),
    )


def voice_conds_to_conditionals(vc: VoiceConds, device: str = "cpu") -> Any:
    """`VoiceConds` -> upstream `Conditionals` on `device`."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    t3 = T3Cond(speaker_emb=torch.from_numpy(vc.t3_speaker_emb),
                cond_prompt_speech_tokens=torch.from_numpy(vc.t3_cond_prompt_speech_tokens),
                emotion_adv=vc.t3_emotion_adv * torch.ones(1, 1, 1))
    gen = dict(prompt_token=torch.from_numpy(vc.gen_prompt_token),
               prompt_token_len=torch.from_numpy(vc.gen_prompt_token_len),
               prompt_feat=torch.from_numpy(vc.gen_prompt_feat), prompt_feat_len=None,
               embedding=torch.from_numpy(vc.gen_embedding))
    return Conditionals(t3, gen).to(device)


def save_conds(vc: VoiceConds, path: Path) -> None:
    """Write `conds.pt` exactly as upstream `Conditionals.save` does (dict(t3=T3Cond.__dict__, gen=gen))."""
    t = torch.from_numpy
    t3 = dict(speaker_emb=t(vc.t3_speaker_emb), clap_emb=None, cond_prompt_speech_tokens=t(vc.t3_cond_prompt_speech_tokens),
              cond_prompt_speech_emb=None, emotion_adv=vc.t3_emotion_adv * torch.ones(1, 1, 1))
    gen = dict(prompt_token=t(vc.gen_prompt_token), prompt_token_len=t(vc.gen_prompt_token_len),
               prompt_feat=t(vc.gen_prompt_feat), prompt_feat_len=None, embedding=t(vc.gen_embedding))
    torch.save(dict(t3=t3, gen=gen), path)


def load_conds(path: Path) -> VoiceConds:
    """Read an upstream `conds.pt` (what `Conditionals.load` reads) without importing chatterbox."""
    from types import SimpleNamespace

    data = torch.load(path, map_location="cpu", weights_only=True)
    return conditionals_to_voice_conds(SimpleNamespace(t3=SimpleNamespace(**data["t3"]), gen=data["gen"]))


def new_voice_id() -> str:
    return f"voice_{uuid.uuid4().hex[:16]}"


class VoiceStore:
    def __init__(self, root: Path, builtin: VoiceConds | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.builtin = builtin
        self._builtin_info = VoiceInfo(BUILTIN_VOICE, "Built-in voice", 0, 0.0, builtin=True)

    def _dir(self, voice_id: str) -> Path:
        # ids are ours (voice_<hex>); anything with a path separator or dot-dot cannot name a stored voice
        if not voice_id or "/" in voice_id or "\\" in voice_id or voice_id.startswith("."):
            raise VoiceNotFoundError(f"Voice {voice_id!r} not found.")
        return self.root / voice_id

    def exists(self, voice_id: str) -> bool:
        if voice_id == BUILTIN_VOICE:
            return self.builtin is not None
        try:
            return (self._dir(voice_id) / CONDS_FILE).exists()
        except VoiceNotFoundError:
            return False

    def add(self, conds: Any, name: str | None, duration_s: float, voice_id: str | None = None) -> VoiceInfo:
        """Store upstream `Conditionals` (or `VoiceConds`); returns the new voice's info."""
        if not isinstance(conds, VoiceConds):
            conds = conditionals_to_voice_conds(conds)
        voice_id = voice_id or new_voice_id()
        info = VoiceInfo(voice_id=voice_id, name=name or voice_id, created_at=int(time.time()),
                         duration_s=round(float(duration_s), 3))
        tmp = self.root / f".tmp-{voice_id}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        try:
            save_conds(conds, tmp / CONDS_FILE)
            (tmp / META_FILE).write_text(json.dumps({"name": info.name, "created_at": info.created_at,
                                                     "duration_s": info.duration_s}))
            tmp.rename(self._dir(voice_id))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info

    def _info(self, path: Path) -> VoiceInfo | None:
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        return VoiceInfo(voice_id=path.name, name=str(meta.get("name", path.name)),
                         created_at=int(meta.get("created_at", 0)), duration_s=float(meta.get("duration_s", 0.0)))

    def list(self) -> list[VoiceInfo]:
        voices = [self._builtin_info] if self.builtin is not None else []
        stored = [self._info(p) for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return voices + sorted((v for v in stored if v is not None), key=lambda v: (v.created_at, v.voice_id))

    def info(self, voice_id: str) -> VoiceInfo:
        if voice_id == BUILTIN_VOICE and self.builtin is not None:
            return self._builtin_info
        info = self._info(self._dir(voice_id)) if self.exists(voice_id) else None
        if info is None:
            raise VoiceNotFoundError(f"Voice {voice_id!r} not found; list voices with GET /v1/voices.")
        return info

    def delete(self, voice_id: str) -> None:
        if voice_id == BUILTIN_VOICE:
            raise InvalidRequestError("The built-in voice cannot be deleted.", param="voice_id",
                                      code="builtin_voice")
        path = self._dir(voice_id)
        if not (path / CONDS_FILE).exists():
            raise VoiceNotFoundError(f"Voice {voice_id!r} not found.")
        trash = self.root / f".del-{voice_id}-{uuid.uuid4().hex[:6]}"
        path.rename(trash)   # atomic: readers see the voice or nothing
        shutil.rmtree(trash, ignore_errors=True)

    def load(self, voice_id: str) -> VoiceConds:
        if voice_id == BUILTIN_VOICE and self.builtin is not None:
            return self.builtin
        path = self._dir(voice_id) / CONDS_FILE
        try:
            return load_conds(path)
        except FileNotFoundError:
            raise VoiceNotFoundError(f"Voice {voice_id!r} not found; list voices with GET /v1/voices.") from None
