"""The package versions a benchmark's result records (one helper for every bench script)."""
from __future__ import annotations

import platform
from importlib import metadata


def versions(*dists: str) -> dict[str, str | None]:
    """{"python": ..., dist: version or None (not installed)} for each distribution named."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
