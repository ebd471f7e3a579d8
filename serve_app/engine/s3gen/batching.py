"""How one engine step's rows are grouped into flow (and HiFT) calls. Pure Python.

A call computes `rows_padded x length_padded` row-tokens whatever its rows need: every row is padded to the
group's longest (bucketed) length, and with CUDA graphs the batch is padded up to the next graph bucket
(pad rows are computed and dropped). One call for a whole mixed step can waste most of its work: 19 stream
steps of 84-259 tokens padded to one call of 32 rows x 320 tokens is 10,240 row-tokens for ~1,550 real ones.
Each extra call costs a fixed overhead (launches / a graph replay, small kernels that fill the GPU less).

`plan_batches` sorts rows by length and splits them into contiguous groups minimising
    sum over groups of (overhead_tokens + rows_padded(n) * padded_length),
by dynamic programming (groups of sorted rows are optimal for a max-length cost), each group within
`max_batch_tokens` padded row-tokens (a single row may exceed it).
"""
from __future__ import annotations

from bisect import bisect_left


def padded_rows(n: int, batch_buckets: tuple[int, ...], length: int = 0, max_graph_size: int | None = None) -> int:
    """Rows a call of n rows `length` long computes: the next graph bucket; n above the largest bucket, above
    `max_graph_size` padded row-tokens (both eager) or without graphs."""
    if not batch_buckets:
        return n
    i = bisect_left(batch_buckets, n)
    if i == len(batch_buckets) or (max_graph_size is not None and batch_buckets[i] * length > max_graph_size):
        return n
    return batch_buckets[i]


def plan_batches(lengths: list[int], max_batch_tokens: int, bucket: int, batch_buckets: tuple[int, ...] = (),
                 overhead_tokens: int = 0, max_graph_size: int | None = None) -> list[tuple[list[int], int]]:
    """lengths: per row (tokens or frames) -> [(row indices, padded length)], every row in exactly one group.

    bucket: lengths are rounded up to a multiple of this; batch_buckets: sorted graph batch sizes (() = none),
    used up to max_graph_size padded row-tokens; overhead_tokens: the fixed cost of one more call, in row-tokens
    (0: as few calls as the budget allows)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    padded = [-(-max(lengths[i], 1) // bucket) * bucket for i in order]
    n = len(order)
    if not n:
        return []
    # cost counted in row-tokens; with overhead 0, fewer calls still win ties (a tiny per-call epsilon)
    per_call = overhead_tokens if overhead_tokens > 0 else 1e-6
    inf = float("inf")
    best = [0.0] + [inf] * n            # best[j]: cheapest plan of the first j sorted rows
    cut = [0] * (n + 1)                 # the first row of the last group of that plan
    for j in range(1, n + 1):
        L = padded[j - 1]               # the group ending at row j-1 is as long as its longest, the last
        for i in range(j - 1, -1, -1):
            rows = padded_rows(j - i, batch_buckets, L, max_graph_size)
            if j - i > 1 and rows * L > max_batch_tokens:
                break                   # longer groups only get bigger
            cost = best[i] + per_call + rows * L
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[tuple[list[int], int]] = []
    j = n
    while j > 0:
        i = cut[j]
        groups.append(([order[k] for k in range(i, j)], padded[j - 1]))
        j = i
    return groups[::-1]
