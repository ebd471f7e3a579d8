"""The S3Gen step's grouping of rows into flow / HiFT calls (batching.py): pure Python."""
from __future__ import annotations

import itertools
import random

import pytest

from serve_app.engine.s3gen import plan_batches
from serve_app.engine.s3gen.batching import padded_rows

BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _cost(lengths, plan, bucket, buckets, overhead, max_graph_size=None):
    return sum(overhead + padded_rows(len(idx), buckets, L, max_graph_size) * L for idx, L in plan)


def _check_plan(lengths, plan, bucket, budget):
    assert sorted(i for idx, _ in plan for i in idx) == list(range(len(lengths)))   # every row exactly once
    for idx, padded in plan:
        assert padded % bucket == 0 and all(lengths[i] <= padded for i in idx)
        assert padded == -(-max(max(lengths[i] for i in idx), 1) // bucket) * bucket


def test_padded_rows_follows_the_graph_buckets():
    assert [padded_rows(n, BUCKETS) for n in (1, 5, 19, 33, 64, 65)] == [1, 6, 24, 48, 64, 65]
    assert padded_rows(19, ()) == 19                              # no graphs: no pad rows
    assert padded_rows(19, BUCKETS, 320, max_graph_size=4096) == 19   # above the graph size limit: eager
    assert padded_rows(19, BUCKETS, 128, max_graph_size=4096) == 24


def test_respects_budget_and_covers_all():
    lengths = [5, 300, 40, 41, 200, 7]
    plan = plan_batches(lengths, max_batch_tokens=512, bucket=32)
    _check_plan(lengths, plan, 32, 512)
    for idx, padded in plan:
        assert len(idx) == 1 or len(idx) * padded <= 512


def test_a_long_row_does_not_pad_a_batch_of_short_ones():
    """The served case that motivated it: 18 stream steps of ~110 tokens and one of 259, graph buckets on.
    One call would compute 24 x 320 row-tokens; two calls compute 24 x 128 + 1 x 320 (+ one call's overhead)."""
    lengths = [109] * 18 + [259]
    plan = plan_batches(lengths, 32_768, 64, BUCKETS, overhead_tokens=256)
    assert ([18], 320) in [(idx, L) for idx, L in plan]          # the long row alone
    assert all(L == 128 for idx, L in plan if idx != [18])
    # 16 + 2 rows beat 18 padded to 24: 6 pad rows of 128 cost more than one more call of 256
    assert _cost(lengths, plan, 64, BUCKETS, 256) == 3 * 256 + 16 * 128 + 2 * 128 + 320 < 2 * 256 + 24 * 128 + 320
    # a large call overhead keeps them together
    assert len(plan_batches(lengths, 32_768, 64, BUCKETS, overhead_tokens=100_000)) == 1


def test_rows_are_not_padded_up_to_a_far_bucket_when_a_split_is_cheaper():
    # 17 equal rows: one call pads to 24 rows; 16 + 1 computes 17 rows for one more call's overhead
    plan = plan_batches([128] * 17, 32_768, 64, BUCKETS, overhead_tokens=256)
    assert sorted(len(idx) for idx, _ in plan) == [1, 16]
    plan = plan_batches([128] * 17, 32_768, 64, BUCKETS, overhead_tokens=2_000)
    assert len(plan) == 1


@pytest.mark.parametrize("seed", range(30))
def test_the_plan_is_the_cheapest_split_of_the_sorted_rows(seed):
    """Against brute force over every split of the length-sorted rows."""
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    lengths = [rng.randint(1, 400) for _ in range(n)]
    bucket, overhead = rng.choice([16, 32, 64]), rng.choice([0, 64, 256, 1024])
    buckets = rng.choice([(), (1, 2, 4, 8), BUCKETS])
    budget = rng.choice([512, 2048, 1 << 20])
    max_graph = rng.choice([None, 1024])
    plan = plan_batches(lengths, budget, bucket, buckets, overhead, max_graph)
    _check_plan(lengths, plan, bucket, budget)
    order = sorted(range(n), key=lambda i: lengths[i])
    pad = lambda i: -(-max(lengths[i], 1) // bucket) * bucket   # noqa: E731
    best = None
    for cuts in itertools.product([False, True], repeat=n - 1):
        groups, cur = [], [order[0]]
        for k, c in enumerate(cuts):
            if c:
                groups.append(cur)
                cur = []
            cur.append(order[k + 1])
        groups.append(cur)
        cand = [(g, max(pad(i) for i in g)) for g in groups]
        if any(len(g) > 1 and padded_rows(len(g), buckets, L, max_graph) * L > budget for g, L in cand):
            continue
        cost = _cost(lengths, cand, bucket, buckets, overhead, max_graph)
        best = cost if best is None else min(best, cost)
    assert _cost(lengths, plan, bucket, buckets, overhead, max_graph) == pytest.approx(best)
    if overhead == 0:   # ties go to fewer calls
        assert len(plan) <= n
