"""VoiceCache: a bounded, thread-safe LRU of enrolled voices (voice_id -> conditionals, any value type)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class VoiceCache:
    def __init__(self, max_voices: int = 256):
        if max_voices < 1:
            raise ValueError(f"max_voices={max_voices} must be >= 1")
        self.max_voices = max_voices
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_evicted = 0

    def get(self, voice_id: str) -> Any | None:
        with self._lock:
            if voice_id not in self._items:
                return None
            self._items.move_to_end(voice_id)
            return self._items[voice_id]

    def put(self, voice_id: str, conds: Any) -> list[str]:
        """Insert or refresh; -> ids evicted to stay within max_voices (least recently used first)."""
        evicted = []
        with self._lock:
            self._items[voice_id] = conds
            self._items.move_to_end(voice_id)
            while len(self._items) > self.max_voices:
                evicted.append(self._items.popitem(last=False)[0])
            self.num_evicted += len(evicted)
        return evicted

    def pop(self, voice_id: str) -> Any | None:
        with self._lock:
            return self._items.pop(voice_id, None)

    def __contains__(self, voice_id: str) -> bool:
        with self._lock:
            return voice_id in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def ids(self) -> list[str]:
        """Least to most recently used."""
        with self._lock:
            return list(self._items)
