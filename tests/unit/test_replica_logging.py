"""configure_replica_logging: inside a Serve replica our records are written once, by our handler."""

import logging

import ray.serve.context

from serve_app.serving.stages.stage_common import configure_replica_logging


def test_replica_logging_writes_each_record_once(monkeypatch):
    root, ours = logging.getLogger(), logging.getLogger("serve_app")
    saved = (list(ours.handlers), ours.propagate, ours.level)
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(self.name)

    other = Catch()
    other.name = "root"                                     # a library's basicConfig in the replica process
    root.addHandler(other)
    monkeypatch.setattr(ray.serve.context, "_get_internal_replica_context", lambda: object())
    try:
        configure_replica_logging()
        (handler,) = [h for h in ours.handlers if getattr(h, "_chatterbox", False)]
        monkeypatch.setattr(handler, "emit", lambda record: seen.append("ours"))
        configure_replica_logging()                         # twice (several stages in one process): one handler
        assert len([h for h in ours.handlers if getattr(h, "_chatterbox", False)]) == 1
        logging.getLogger("serve_app.serving.stages.s3gen_stage").info("a step")
        assert seen == ["ours"]
    finally:
        root.removeHandler(other)
        ours.handlers[:] = saved[0]
        ours.propagate, ours.level = saved[1], saved[2]
