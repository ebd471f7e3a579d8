"""bench/profile_summary.py: per-thread shares from py-spy's collapsed stacks."""
from bench.profile_summary import summarize


def test_shares_per_thread_leaf_and_inclusive():
    lines = ["thread (1): step;run (a.py:1);step (e.py:147) 3\n",
             "thread (1): step;run (a.py:1);prefill (l.py:9) 1\n",
             "thread (2): loop;select (s.py:3) 4\n", "\n"]
    out = summarize(lines, top=5).splitlines()
    assert out[0] == "thread (1): step: 4 samples"
    assert "  leaf  75.0%  step (e.py:147)" in out and "  leaf  25.0%  prefill (l.py:9)" in out
    assert "  incl 100.0%  run" in out
    assert "thread (2): loop: 4 samples" in out and "  leaf 100.0%  select (s.py:3)" in out
