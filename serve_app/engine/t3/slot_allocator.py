"""KV-cache slots (one slot = a cond row and an uncond row): ints only (no torch)."""
from __future__ import annotations

import heapq


class SlotAllocator:
    """Hands out the lowest free slot so running requests stay packed at the front of the cache.

    Decode runs over slots [0, max_used + 1), so packing keeps the captured batch bucket small.
    """

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} slots are in use; check can_allocate() first")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def max_used(self) -> int:
        """Highest slot in use, or -1 when none is."""
        return max(self._used, default=-1)
