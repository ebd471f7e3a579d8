"""Shared helpers for the S3Gen engine / enrollment tests: one tiny S3Gen built per process, random voices."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from serve_app.engine.s3gen.quality import log_spectral_distance  # noqa: F401  (re-export)


@functools.lru_cache(maxsize=2)
def _built(preset: str):
    from serve_app.model.presets import build_s3gen, get_preset

    torch.manual_seed(0)
    return build_s3gen(get_preset(preset)).eval()


def fresh_s3gen(preset: str = "tiny"):
    """A private copy of the process-wide random-weight S3Gen (the engine casts / quantizes in place)."""
    return copy.deepcopy(_built(preset))


def random_voice(num_prompt_tokens: int, seed: int, odd_feat: bool = False) -> dict:
    """An upstream gen dict (what `embed_ref` returns) with random content."""
    g = torch.Generator().manual_seed(seed)
    F = 2 * num_prompt_tokens + (1 if odd_feat else 0)
    return dict(
        prompt_token=torch.randint(0, 6561, (1, num_prompt_tokens), generator=g),
        prompt_token_len=torch.tensor([num_prompt_tokens]),
        prompt_feat=torch.randn(1, F, 80, generator=g) * 2 - 5,
        prompt_feat_len=None,
        embedding=torch.randn(1, 192, generator=g),
    )


def random_tokens(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6561, (n,), generator=g)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads spin badly on a shared 2-core box (measured 7x slower with 2 threads); use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
