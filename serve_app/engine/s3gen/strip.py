"""Drop what a vocoder replica never runs (S3 tokenizer, CAMPPlus speaker encoder) from an upstream S3Gen."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ENROLLMENT_MODULES = ("tokenizer", "speaker_encoder")


def strip_enrollment_modules(s3gen: torch.nn.Module) -> list[str]:
    """Replace s3gen.tokenizer / s3gen.speaker_encoder with None, in place. -> names removed.
    The S3GenEngine needs only s3gen.flow and s3gen.mel2wav; upstream `embed_ref` / `S3Gen.device` no longer
    work on the stripped module (enroll with `VoiceEnroller` on a full one)."""
    removed = []
    for name in ENROLLMENT_MODULES:
        if getattr(s3gen, name, None) is not None:
            n = sum(p.numel() for p in getattr(s3gen, name).parameters())
            # nn.Module.__setattr__ with None keeps the slot in _modules but frees the parameters
            setattr(s3gen, name, None)
            removed.append(name)
            log.info("stripped s3gen.%s (%.1fM params)", name, n / 1e6)
    return removed
