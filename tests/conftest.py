"""Shared fixtures: random-weight checkpoints written once per machine and reused (they take a while on CPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for the network in tests: hub downloads fail fast and the random fallback is what we test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CHATTERBOX_WATERMARK", "false")

CACHE = Path(os.environ.get("CHATTERBOX_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tests"))


def _checkpoint(name: str, preset: str, multilingual: bool = False) -> Path:
    from serve_app.model.checkpoint import write_random_checkpoint

    return write_random_checkpoint(CACHE / name, preset=preset, multilingual=multilingual)


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    return _checkpoint("tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_multilingual_checkpoint() -> Path:
    return _checkpoint("tiny-multilingual", "tiny", multilingual=True)


@pytest.fixture(scope="session")
def full_checkpoint() -> Path:
    return _checkpoint("full", "full")
