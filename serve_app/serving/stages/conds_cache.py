"""A stage's bounded LRU of voice conditionals, filled from the Voice stage by voice id.

`VoiceConds` (numpy) crosses the handle; the cache keeps whatever the stage's backend wants on its device
(`convert`), so a hot voice costs one handle call per replica, not one per request. Concurrent misses for
the same voice share one fetch.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from serve_app.contracts import VoiceConds


class CondsCache:
    def __init__(self, fetch: Callable[[str], Awaitable[VoiceConds]], convert: Callable[[VoiceConds], Any],
                 max_entries: int = 64, stage: str = "") -> None:
        self._fetch = fetch
        self._convert = convert
        self._max_entries = max_entries
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self._stage = stage

    @classmethod
    def from_voice_stage(cls, voice_handle: Any, convert: Callable[[VoiceConds], Any], max_entries: int = 64,
                         stage: str = "") -> CondsCache:
        """Filled by the Voice stage's `get_conds` through its handle."""
        async def fetch(voice_id: str) -> VoiceConds:
            return await voice_handle.get_conds.remote(voice_id)

        return cls(fetch, convert, max_entries, stage)

    def __len__(self) -> int:
        return len(self._entries)

    def _count(self, result: str) -> None:
        try:
            from serve_app.serving.metrics import get_metrics

            get_metrics().voice_cache_lookups_total.inc(1, tags={"stage": self._stage, "result": result})
        except Exception:  # outside a Ray worker (unit tests): no metrics
            pass

    def invalidate(self, voice_id: str) -> None:
        self._entries.pop(voice_id, None)

    async def get(self, voice_id: str) -> Any:
        if voice_id in self._entries:
            self._entries.move_to_end(voice_id)
            self._count("hit")
            return self._entries[voice_id]
        if voice_id in self._inflight:
            return await asyncio.shield(self._inflight[voice_id])
        self._count("miss")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[voice_id] = fut
        try:
            value = self._convert(await self._fetch(voice_id))
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._inflight.pop(voice_id, None)
        fut.set_result(value)
        self._entries[voice_id] = value
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return value
