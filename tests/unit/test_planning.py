"""`plan`: GPU fractions per stage follow the estimator, and `auto` trades precision for fit."""
from quant.strategies import AUTO_ORDER
from serve_app.planning import plan_stages


def test_fractions_cover_the_estimate_and_pack():
    used, plans = plan_stages(24, "mixed", concurrency=32)
    assert used == "mixed"
    assert {p.stage for p in plans} == {"t3", "s3gen", "voice"}
    for p in plans:
        assert p.num_gpus * 24 * 2**30 >= p.estimate_bytes          # the share holds the replica
        assert round(p.num_gpus * 20) == p.num_gpus * 20             # multiples of 0.05
        assert p.max_per_gpu * p.num_gpus <= 1.0


def test_auto_gets_more_aggressive_on_smaller_cards():
    big, _ = plan_stages(80, "auto", concurrency=32)
    small, _ = plan_stages(8, "auto", concurrency=32)
    assert AUTO_ORDER.index(small) > AUTO_ORDER.index(big)


def test_t3_slots_that_fit_grow_with_the_budget_and_match_the_estimator():
    from quant import QuantSpec, estimate_replica
    from quant.estimator import GiB
    from serve_app.planning import t3_slots_that_fit

    specs = {"t3": QuantSpec("nf4", "bf16"), "t3_extra": QuantSpec("none", "fp32")}
    small, big = (t3_slots_that_fit(int(g * GiB), specs, upper=256) for g in (8, 57))
    assert 1 <= small < big
    # the answer is the largest count the estimator fits in 90% of the budget
    fits = lambda n: estimate_replica(specs, num_requests=n, seq_len=1536).total_bytes <= 0.9 * 8 * GiB
    assert fits(small) and not fits(small + 1)
    assert t3_slots_that_fit(int(57 * GiB), specs, upper=64) == 64
