"""Pure-Python bookkeeping of the T3 engine: slots, sequences, scheduler (no torch, no model)."""
import ast
from pathlib import Path

import pytest

from serve_app.engine.t3.scheduler import Scheduler
from serve_app.engine.t3.sequence import Sequence, SequenceStatus
from serve_app.engine.t3.slot_allocator import SlotAllocator

ENGINE_DIR = Path(__file__).resolve().parents[2] / "serve_app" / "engine" / "t3"
STOP = 6562


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_engine_imports_no_serving_frameworks():
    for path in ENGINE_DIR.glob("*.py"):
        assert not _imports(path) & {"ray", "fastapi", "pydantic", "starlette"}, path.name


@pytest.mark.parametrize("name", ["sequence.py", "slot_allocator.py", "scheduler.py"])
def test_bookkeeping_does_not_import_torch(name):
    assert "torch" not in _imports(ENGINE_DIR / name)


def test_slot_allocator_lowest_first_and_reuse():
    a = SlotAllocator(3)
    assert [a.allocate() for _ in range(3)] == [0, 1, 2]
    assert not a.can_allocate()
    with pytest.raises(RuntimeError):
        a.allocate()
    a.free(1)
    a.free(0)
    assert a.max_used() == 2
    assert a.allocate() == 0 and a.allocate() == 1
    with pytest.raises(ValueError):
        SlotAllocator(2).free(0)


def test_sequence_positions_stop_and_length():
    s = Sequence("a", prompt_len=80, max_new_tokens=3, stop_token=STOP)
    s.append_token(5)
    assert s.feed_position == 80  # first sampled token is fed right after the prompt
    assert not s.append_token(6561)  # invalid tokens count toward the cap, like upstream
    assert s.feed_position == 81
    assert s.append_token(7) and s.finish_reason == "length"
    with pytest.raises(RuntimeError):
        s.append_token(1)
    t = Sequence("b", prompt_len=10, max_new_tokens=100, stop_token=STOP)
    assert t.append_token(STOP) and t.finish_reason == "stop" and t.status == SequenceStatus.FINISHED


def _seq(rid, n=10):
    return Sequence(rid, prompt_len=40, max_new_tokens=n, stop_token=STOP)


def test_scheduler_admits_fifo_up_to_slots_and_prefill_limit():
    sch = Scheduler(num_slots=3, max_prefill_requests=2)
    for rid in "abcd":
        sch.add(_seq(rid))
    with pytest.raises(ValueError):
        sch.add(_seq("a"))
    assert [s.request_id for s in sch.admit()] == ["a", "b"]
    assert [s.request_id for s in sch.admit()] == ["c"]
    assert sch.admit() == [] and not sch.can_admit()
    assert [s.slot for s in sch.running_seqs()] == [0, 1, 2]
    assert sch.num_decode_slots() == 3


def test_scheduler_retire_frees_slot_for_next_request():
    sch = Scheduler(num_slots=2, max_prefill_requests=4)
    for rid in "abc":
        sch.add(_seq(rid))
    a, b = sch.admit()
    a.finish("stop")
    sch.retire(a)
    (c,) = sch.admit()
    assert c.slot == a.slot == 0
    assert sch.num_decode_slots() == 2
    b.finish("length")
    sch.retire(b)
    assert sch.num_decode_slots() == 1
    with pytest.raises(RuntimeError):
        sch.retire(c)  # not finished


def test_scheduler_cancel_waiting_and_running():
    sch = Scheduler(num_slots=1, max_prefill_requests=4)
    sch.add(_seq("run"))
    sch.add(_seq("wait"))
    sch.admit()
    assert sch.cancel("run") and sch.cancel("wait") and not sch.cancel("nope")
    assert sch.running  # nothing is freed until take_cancelled (the engine's next step)
    out = sch.take_cancelled()
    assert {s.request_id for s in out} == {"run", "wait"}
    assert all(s.finish_reason == "cancelled" for s in out)
    assert not sch.has_unfinished() and sch.allocator.num_free == 1
    assert sch.get("run") is None


def test_scheduler_admits_lower_priority_first_fifo_within():
    """A request's first text chunk (priority 0) goes before others' later chunks (1) waiting for a slot."""
    sch = Scheduler(num_slots=1, max_prefill_requests=1)
    for rid, prio in (("late-a", 1), ("first-a", 0), ("late-b", 1), ("first-b", 0)):
        sch.add(Sequence(rid, prompt_len=40, max_new_tokens=10, stop_token=STOP, priority=prio))
    assert [s.request_id for s in sch.waiting] == ["first-a", "first-b", "late-a", "late-b"]
    order = []
    while sch.waiting:
        (seq,) = sch.admit()
        order.append(seq.request_id)
        seq.finish("length")
        sch.retire(seq)
    assert order == ["first-a", "first-b", "late-a", "late-b"]
