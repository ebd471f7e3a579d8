"""Per-row guidance, logits processing and sampling without host syncs (capturable in a CUDA graph).

Processing follows upstream T3.inference step for step: CFG combine -> repetition penalty (HF
RepetitionPenaltyLogitsProcessor) -> temperature -> min-p (HF MinPLogitsWarper) -> top-p (HF TopPLogitsWarper)
-> softmax -> sample. Sampling is an exponential race, argmax(probs / E) with E ~ Exp(1), which draws from
`probs` exactly like torch.multinomial but needs no sync. E comes from a counter-based hash of
(request seed, sample index, vocab id), so a request's draws do not depend on which rows it shares a batch with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    # x: int64 in [0, 2^32) -> int64 in [0, 2^32). A lowbias32-style mixer; multipliers are < 2^31 so every
    # int64 product is exact on CPU and CUDA.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    return x


def exponential_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    # seeds: [N] int64, counters: [N] int64 (index of the sample within its request), vocab_hash: [V] int64
    # -> E: [N, V] float32, i.i.d. Exp(1) per (seed, counter, vocab id)
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    key = hash32(hash32(lo ^ 0x3C6EF372) ^ hi)  # [N]
    key = hash32(key ^ (counters & _MASK32))  # [N]
    bits = hash32(key[:, None] ^ vocab_hash[None, :])  # [N, V]
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(u)


def make_vocab_hash(vocab_size: int, device) -> torch.Tensor:
    # -> [V] int64, a per-vocab-id key mixed into the noise
    return hash32(torch.arange(vocab_size, dtype=torch.int64, device=device) + 0x165667B1)


@dataclass
class SamplingTensors:
    """Per-request sampling parameters, one entry per request (views into the engine's slot buffers)."""

    cfg_weight: torch.Tensor  # [N] float32
    temperature: torch.Tensor  # [N] float32; <= 0 means greedy
    top_p: torch.Tensor  # [N] float32
    min_p: torch.Tensor  # [N] float32
    repetition_penalty: torch.Tensor  # [N] float32
    seed: torch.Tensor  # [N] int64
    counter: torch.Tensor  # [N] int64


def process_logits(logits: torch.Tensor, seen: torch.Tensor, p: SamplingTensors) -> torch.Tensor:
    # logits: [2N, V] float32 rows (cond, uncond) per request, seen: [N, V] bool (tokens to penalize)
    # -> processed logits [N, V] float32 (filtered entries are -inf)
    cond, uncond = logits[0::2], logits[1::2]  # [N, V] each
    x = cond + p.cfg_weight[:, None] * (cond - uncond)

    pen = p.repetition_penalty[:, None]
    x = torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)

    temp = torch.where(p.temperature > 0, p.temperature, torch.ones_like(p.temperature))
    x = x / temp[:, None]

    probs = torch.softmax(x, dim=-1)
    x = x.masked_fill(probs < p.min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))

    sorted_x, sorted_idx = torch.sort(x, dim=-1, descending=False)
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
    remove_sorted = cum <= (1 - p.top_p[:, None])
    remove_sorted[:, -1] = False  # keep at least the top token
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return x.masked_fill(remove, float("-inf"))


def sample_tokens(logits: torch.Tensor, seen: torch.Tensor, p: SamplingTensors, vocab_hash: torch.Tensor) -> torch.Tensor:
    # logits: [2N, V] float32, seen: [N, V] bool -> tokens [N] int64 (greedy rows take the argmax)
    x = process_logits(logits, seen, p)
    probs = torch.softmax(x, dim=-1)
    noise = exponential_noise(p.seed, p.counter, vocab_hash)  # [N, V]
    sampled = torch.argmax(probs / noise, dim=-1)
    greedy = torch.argmax(x, dim=-1)
    return torch.where(p.temperature > 0, sampled, greedy)
