"""The app's Prometheus metrics as the bench reads them: parse Ray's text exposition, sum series by name and
labels, and turn two scrapes (before and after a level) into per-stage busy time per second of audio.

Ray's exporter prefixes application metrics with `ray_` and may or may not repeat a counter's `_total`; names
are compared without either (`canonical`). Pure Python.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import httpx

Sample = tuple[str, dict[str, str], float]   # (canonical name, labels, value)

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def canonical(name: str) -> str:
    """`ray_chatterbox_x_total` and `chatterbox_x_total_total` -> `chatterbox_x`."""
    name = name.removeprefix("ray_")
    while name.endswith("_total"):
        name = name.removesuffix("_total")
    return name


def parse(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments and malformed lines skipped)."""
    out: list[Sample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line.strip())
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(m.group(3) or "")}
        out.append((canonical(m.group(1)), labels, value))
    return out


def total(samples: Sequence[Sample], name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum of every series of metric `name` (any spelling) whose labels include `labels`; None if none exist."""
    want = canonical(name)
    values = [v for n, ls, v in samples if n == want and all(ls.get(k) == x for k, x in (labels or {}).items())]
    return sum(values) if values else None


def scrape(url: str, timeout_s: float = 10.0) -> list[Sample] | None:
    """One scrape of `url`; None when the endpoint does not answer (the bench then reports nulls)."""
    try:
        r = httpx.get(url, timeout=timeout_s)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse(r.text)


def delta(before: Sequence[Sample] | None, after: Sequence[Sample] | None, name: str,
          labels: Mapping[str, str] | None = None) -> float | None:
    """after - before of a counter; None when either is missing or it went down (a replica restarted)."""
    if before is None or after is None:
        return None
    a = total(after, name, labels)
    if a is None:
        return None
    d = a - (total(before, name, labels) or 0.0)
    return d if d >= 0 else None


def first_delta(before, after, candidates: Sequence[tuple[str, Mapping[str, str] | None]]
                ) -> tuple[float | None, str | None]:
    """The delta of the first candidate metric that exists in the later scrape: (delta, its name)."""
    for name, labels in candidates:
        d = delta(before, after, name, labels)
        if d is not None:
            return d, name
    return None, None
