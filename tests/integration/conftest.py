"""Integration fixtures: the shared Ray Serve instance (see serve_fixture.py)."""
from __future__ import annotations

import pytest

from serve_fixture import ServeInstance, start_serve, stop_serve


@pytest.fixture(scope="session")
def serve_app_instance(tiny_checkpoint) -> ServeInstance:
    instance = start_serve(tiny_checkpoint)
    yield instance
    stop_serve(instance)
