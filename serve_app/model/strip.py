"""Drop what a vocoder replica never runs (S3 tokenizer, CAMPPlus speaker encoder) from an upstream S3Gen."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ENROLLMENT_MODULES = {"tokenizer": "S3Tokenizer", "speaker_encoder": "CAMPPlus"}


class EnrollmentRemoved(torch.nn.Module):
    """Stands in for the S3 tokenizer / CAMPPlus in a vocoder replica: no weights, a clear error when called,
    and an empty parameter so upstream's `S3Gen.device` (read off the tokenizer) still works."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} was removed from this S3Gen (a vocoder replica); enroll voices in the "
                           f"voice stage, which loads it")

    inference = forward


def is_removed(module: torch.nn.Module | None) -> bool:
    return module is None or isinstance(module, EnrollmentRemoved)


def strip_enrollment_modules(s3gen: torch.nn.Module) -> list[str]:
    """Replace s3gen.tokenizer (124M params) / s3gen.speaker_encoder with `EnrollmentRemoved`, in place.
    -> names removed. The S3GenEngine needs only s3gen.flow and s3gen.mel2wav; enroll with `VoiceEnroller` on a
    full S3Gen."""
    removed = []
    for attr, label in ENROLLMENT_MODULES.items():
        current = getattr(s3gen, attr, None)
        if not is_removed(current):
            n = sum(p.numel() for p in current.parameters())
            setattr(s3gen, attr, EnrollmentRemoved(label).to(next(s3gen.flow.parameters()).device))
            removed.append(attr)
            log.info("stripped s3gen.%s (%.1fM params)", attr, n / 1e6)
    return removed
