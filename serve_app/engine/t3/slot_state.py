"""Per-slot decode state on the device: static buffers that decode (and its CUDA graphs) read and advance."""
from __future__ import annotations

import torch

from .sampling import SamplingTensors


class SlotState:
    """Buffers indexed by slot. Decode over slots [0, n) reads them as views, so graphs need no input copies.

    Admission writes one slot with scalar fills (no host->device copy, no sync); decode advances positions of
    active slots in place; retirement makes the slot an inert padding row (position 0, inactive).
    """

    def __init__(self, num_slots: int, vocab_size: int, device, start_token: int):
        i64 = dict(dtype=torch.int64, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.start_token = start_token
        self.last_token = torch.zeros(num_slots, **i64)  # [S] token fed at the next decode
        self.rope_pos = torch.zeros(num_slots, **i64)  # [S] its RoPE position (= KV write index)
        self.speech_pos = torch.zeros(num_slots, **i64)  # [S] its learned speech position
        self.active = torch.zeros(num_slots, **i64)  # [S] 1 while a request owns the slot
        self.seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)  # [S, V] repetition set
        self.out_tokens = torch.zeros(num_slots, **i64)  # [S] tokens sampled by the last decode
        self.sampling = SamplingTensors(
            cfg_weight=torch.zeros(num_slots, **f32),
            temperature=torch.ones(num_slots, **f32),
            top_p=torch.ones(num_slots, **f32),
            min_p=torch.zeros(num_slots, **f32),
            repetition_penalty=torch.ones(num_slots, **f32),
            seed=torch.zeros(num_slots, **i64),
            counter=torch.zeros(num_slots, **i64),  # [S] number of tokens sampled so far
        )

    def sampling_view(self, n: int) -> SamplingTensors:
        s = self.sampling
        return SamplingTensors(*(t[:n] for t in (s.cfg_weight, s.temperature, s.top_p, s.min_p,
                                                  s.repetition_penalty, s.seed, s.counter)))

    def sampling_at(self, slots: torch.Tensor) -> SamplingTensors:
        # slots: [N] int64 -> gathered copies
        s = self.sampling
        return SamplingTensors(*(t[slots] for t in (s.cfg_weight, s.temperature, s.top_p, s.min_p,
                                                     s.repetition_penalty, s.seed, s.counter)))

    def admit(self, slot: int, *, cfg_weight: float, temperature: float, top_p: float, min_p: float,
              repetition_penalty: float, seed: int) -> None:
        """Set a slot's sampling parameters and reset its repetition set to {BOS} (as upstream's generated_ids)."""
        s = self.sampling
        s.cfg_weight[slot] = cfg_weight
        s.temperature[slot] = temperature
        s.top_p[slot] = top_p
        s.min_p[slot] = min_p
        s.repetition_penalty[slot] = repetition_penalty
        s.seed[slot] = seed
        s.counter[slot] = 0
        self.seen[slot] = False
        self.seen[slot, self.start_token] = True

    def start(self, slot: int, prompt_len: int) -> None:
        """After prefill sampled the first token (into last_token[slot]): next decode feeds it at prompt_len."""
        self.rope_pos[slot] = prompt_len
        self.speech_pos[slot] = 1
        self.sampling.counter[slot] = 1
        self.active[slot] = 1

    def release(self, slot: int) -> None:
        self.active[slot] = 0
        self.rope_pos[slot] = 0
        self.speech_pos[slot] = 0
