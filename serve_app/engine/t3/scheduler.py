"""Continuous batching: admit waiting requests between steps, retire finished and cancelled ones (no torch)."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence, SequenceStatus
from .slot_allocator import SlotAllocator


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_requests: int):
        self.allocator = SlotAllocator(num_slots)
        self.max_prefill_requests = max_prefill_requests
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._by_id: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request_id {seq.request_id!r} is already in flight; use a unique id per request")
        self._by_id[seq.request_id] = seq
        # behind every waiting sequence of its priority or a lower one: FIFO within a priority
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].priority > seq.priority:
            i -= 1
        self.waiting.insert(i, seq)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, request_id: str) -> bool:
        """Mark a request; it is retired (and its slot freed) at the next step. False if unknown or done."""
        seq = self._by_id.get(request_id)
        if seq is None or seq.is_finished:
            return False
        seq.cancel_requested = True
        return True

    def take_cancelled(self) -> list[Sequence]:
        """Retire every sequence marked cancelled, freeing its slot; returns them finished 'cancelled'."""
        out = [s for s in self.waiting if s.cancel_requested]
        if out:
            self.waiting = deque(s for s in self.waiting if not s.cancel_requested)
        out += [s for s in self.running.values() if s.cancel_requested]
        for seq in out:
            seq.finish("cancelled")
            self.retire(seq)
        return out

    def can_admit(self) -> bool:
        return bool(self.waiting) and self.allocator.can_allocate()

    def admit(self) -> list[Sequence]:
        """Move up to max_prefill_requests waiting sequences into free slots (by priority, then FIFO)."""
        admitted = []
        while self.can_admit() and len(admitted) < self.max_prefill_requests:
            seq = self.waiting.popleft()
            seq.slot = self.allocator.allocate()
            seq.status = SequenceStatus.RUNNING
            self.running[seq.slot] = seq
            admitted.append(seq)
        return admitted

    def running_seqs(self) -> list[Sequence]:
        return [self.running[s] for s in sorted(self.running)]

    def num_decode_slots(self) -> int:
        """Decode covers slots [0, this); holes below the highest running slot are padding rows."""
        return self.allocator.max_used() + 1

    def retire(self, seq: Sequence) -> None:
        """Forget a finished sequence and free its slot."""
        if not seq.is_finished:
            raise RuntimeError(f"retire() needs a finished sequence, got {seq}")
        if seq.slot >= 0 and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.allocator.free(seq.slot)
        self._by_id.pop(seq.request_id, None)
