"""The system benchmark's arithmetic on synthetic chunk timings: stall-free playback, percentiles, a level's
summary, token caps, Prometheus parsing, deploy-file overrides. No server, no GPU."""
from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest

from bench.system import prom
from bench.system.loadgen import RequestSpec, closed_loop, fixed_batch
from bench.system.measure import (
    BYTES_PER_SECOND,
    CANCELLED,
    LengthCheck,
    RequestResult,
    Stalls,
    percentile,
    playback_stalls,
    summarize,
)
from bench.system.server import parse_override, with_overrides
from bench.system.texts import TEXTS, capped_audio_s, capped_tokens


def stall_counts(*args, **kwargs) -> tuple[int, float]:
    """(stalls, seconds waited) of playback_stalls."""
    s = playback_stalls(*args, **kwargs)
    return s.count, s.waited_s


def _stream(times, seconds, *, sent_at=0.0, expected=None, status=200, index=0) -> RequestResult:
    sizes = [int(s * BYTES_PER_SECOND) for s in seconds]
    return RequestResult(index=index, stream=True, text_chars=10, sent_at=sent_at, status=status,
                         ttfa_s=times[0] if times else None, e2e_s=times[-1] if times else 0.1,
                         audio_bytes=sum(sizes), expected_audio_s=expected, chunk_times_s=list(times),
                         chunk_bytes=sizes)


# -- stall-free -----------------------------------------------------------------------------------------

def test_stream_that_keeps_ahead_of_the_player_is_stall_free():
    # 1 s of audio at t=0.5, then chunks before the player runs out (at 1.5, then 3.5)
    assert stall_counts([0.5, 1.4, 3.0], [1.0, 2.0, 1.0]) == (0, 0.0)


def test_chunk_after_the_audio_received_runs_out_is_a_stall():
    # player starts at 0.5 with 1 s: dry at 1.5; the next chunk comes at 2.0 -> waits 0.5 s
    n, waited = stall_counts([0.5, 2.0], [1.0, 1.0])
    assert n == 1 and waited == pytest.approx(0.5)


def test_player_resumes_after_a_stall_and_counts_later_ones_from_there():
    # dry at 1.5, chunk at 2.0 (0.5 s wait), plays until 3.0; chunk at 2.9 in time; dry at 3.5, chunk at 4.0
    n, waited = stall_counts([0.5, 2.0, 2.9, 4.0], [1.0, 1.0, 0.5, 1.0])
    assert n == 2 and waited == pytest.approx(1.0)


def test_first_stall_matches_the_cumulative_rule():
    # t_i - t_first > A_{i-1}: with A the audio received before chunk i
    times, audio = [0.2, 0.9, 1.9, 2.7], [0.8, 0.8, 0.8, 0.8]
    first_by_rule = next(i for i in range(1, len(times)) if times[i] - times[0] > sum(audio[:i]))
    assert first_by_rule == 2
    assert stall_counts(times[:first_by_rule], audio[:first_by_rule]) == (0, 0.0)
    assert stall_counts(times[:first_by_rule + 1], audio[:first_by_rule + 1])[0] == 1


def test_tolerance_forgives_small_gaps():
    assert stall_counts([0.0, 1.05], [1.0, 1.0])[0] == 1
    assert stall_counts([0.0, 1.05], [1.0, 1.0], tolerance_s=0.1)[0] == 0


def test_no_chunks_no_stalls():
    assert stall_counts([], []) == (0, 0.0)
    assert playback_stalls([], []) == Stalls(0, 0.0, None, None, None)


# -- where streams stall (times and durations are binary fractions: exact equality holds) ----------------------

def test_first_stall_is_the_late_chunk_and_played_is_the_audio_before_it():
    # dry at 2.0 after chunks 0 and 1; chunk 2 at 2.5: index 2, played 1 + 1 = 2.0 s, 2.5 s after first audio
    assert playback_stalls([0.0, 0.5, 2.5], [1.0, 1.0, 1.0]) == Stalls(1, 0.5, 2, 2.0, 2.5)
    # arriving exactly when the player runs dry is not a stall (strict >, as in playback_stalls)
    assert playback_stalls([0.0, 0.5, 2.0], [1.0, 1.0, 1.0]) == Stalls()


def test_chunk_right_after_the_first_is_index_one():
    assert playback_stalls([0.0, 1.5], [1.0, 1.0]) == Stalls(1, 0.5, 1, 1.0, 1.5)


def test_first_stall_details_with_uneven_chunks_and_a_later_stall():
    # first audio at 0.5; dry at 1.5, chunk 1 (0.75) in time -> dry at 2.0; chunk 2 at 2.5 late (first: index 2,
    # played 1.0 + 0.5 = 1.5 s, 2.0 s after first audio, waits 0.5); resumes -> dry at 2.75; chunk 3 at 2.75 just
    # in time -> dry at 4.75; chunk 4 at 5.5 late (waits 0.75). Without the shift at 2.5 chunk 3 would be late.
    d = playback_stalls([0.5, 1.25, 2.5, 2.75, 5.5], [1.0, 0.5, 0.25, 2.0, 1.0])
    assert d == Stalls(count=2, waited_s=1.25, first_index=2, first_at_played_s=1.5, first_after_first_audio_s=2.0)
    assert stall_counts([0.5, 1.25, 2.5, 2.75, 5.5], [1.0, 0.5, 0.25, 2.0, 1.0]) == (2, 1.25)


def test_a_gap_within_the_tolerance_shifts_nothing_and_is_not_the_first_stall():
    times, audio = [0.0, 1.0625, 2.1875], [1.0, 1.0, 1.0]
    # tolerance 0.125: chunk 1 (0.0625 late) forgiven, player still dry at 2.0; chunk 2 later than 2.125
    assert playback_stalls(times, audio, tolerance_s=0.125) == Stalls(1, 0.1875, 2, 2.0, 2.1875)
    # no tolerance: chunk 1 is the first stall (played 1.0 s), resume -> dry at 2.0625, chunk 2 late again
    assert playback_stalls(times, audio) == Stalls(2, 0.1875, 1, 1.0, 1.0625)


def test_summary_says_where_streams_first_stalled():
    q = [0.25] * 7
    results = [
        _stream([0.0, 1.5], [1.0, 1.0], index=0),                                        # #1, played 1.0, +1.5
        _stream([0.5, 1.25, 2.5, 2.75, 5.5], [1.0, 0.5, 0.25, 2.0, 1.0], index=1),       # #2, 1.5, +2.0; 2 stalls
        _stream([0.0, 0.125, 0.375, 0.625, 0.875, 2.0], q[:6], index=2),                 # #5, 1.25, +2.0
        _stream([0.0, 0.125, 0.375, 0.625, 0.875, 1.125, 3.0], q, index=3),              # #6, 1.5, +3.0
        _stream([0.5, 1.0], [1.0, 1.0], index=4),                                        # no stall
    ]
    s = summarize(results, window_s=10.0)
    assert s["stall_streams"] == 5 and s["stall_free_fraction"] == pytest.approx(0.2)
    assert s["stall_first_chunk_index_hist"] == {"1": 1, "2": 1, "5+": 2}
    assert list(s["stall_first_chunk_index_hist"]) == ["1", "2", "5+"]
    assert s["stall_first_at_played_s_p50"] == pytest.approx(1.375)          # of 1.0, 1.25, 1.5, 1.5
    assert s["stall_first_after_first_audio_s_p50"] == pytest.approx(2.0)    # of 1.5, 2.0, 2.0, 3.0
    assert s["stalls_per_stalled_stream_mean"] == pytest.approx(1.25)        # (1 + 2 + 1 + 1) / 4
    json.dumps(s)


def test_summary_splits_stall_free_between_the_opening_wave_and_later_streams():
    results = [
        _stream([0.0, 1.5], [1.0, 1.0], sent_at=0.0, index=0),          # opening, stalled
        _stream([0.5, 1.0], [1.0, 1.0], sent_at=0.4, index=1),          # opening, stall-free
        _stream([0.0, 1.5], [1.0, 1.0], sent_at=0.5, index=2),          # later (at OPENING_S), stalled
        _stream([0.5, 1.0], [1.0, 1.0], sent_at=3.0, index=3),          # later, stall-free
        _stream([0.5, 1.0], [1.0, 1.0], sent_at=4.0, index=4),          # later, stall-free
    ]
    s = summarize(results, window_s=10.0)
    assert s["stall_streams_opening"] == 2
    assert s["stall_free_opening"] == pytest.approx(0.5)
    assert s["stall_free_after_opening"] == pytest.approx(2 / 3)
    assert s["stall_free_fraction"] == pytest.approx(0.6)
    from bench.system.report import _stall_lines
    line = _stall_lines([{**s, "stream": True, "name": "c5-stream"}])[-1]
    assert "stall-free 50.0% of the 2 sent in the first 0.5 s (the opening wave), 66.7% of the 3 after" in line
    empty = summarize([], window_s=1.0)
    assert empty["stall_free_opening"] is None and empty["stall_streams_opening"] == 0


def test_summary_without_stalls_has_no_stall_positions():
    for results in ([_stream([0.5, 1.0], [1.0, 1.0])], []):
        s = summarize(results, window_s=5.0)
        assert s["stall_first_chunk_index_hist"] == {}
        assert s["stall_first_at_played_s_p50"] is None and s["stall_first_after_first_audio_s_p50"] is None
        assert s["stalls_per_stalled_stream_mean"] is None


# -- percentiles and summaries ------------------------------------------------------------------------------

def test_percentile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 10.0
    assert percentile(xs, 95) == pytest.approx(4.0 + 0.8 * 6.0)   # numpy.percentile(xs, 95) = 8.8
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None


def test_summary_counts_errors_by_status_and_leaves_cancelled_out():
    results = [
        _stream([0.5, 1.0], [1.0, 1.0], expected=2.0),
        _stream([0.7, 3.0], [1.0, 1.0], expected=2.0, index=1),                  # stalls
        RequestResult(index=2, stream=True, text_chars=5, sent_at=0.0, status=429, error_code="server_busy"),
        RequestResult(index=3, stream=True, text_chars=5, sent_at=0.0, status="exc:ReadError"),
        RequestResult(index=4, stream=True, text_chars=5, sent_at=0.0, status=CANCELLED),
    ]
    s = summarize(results, window_s=10.0)
    assert (s["requests"], s["ok"], s["errors"], s["cancelled_at_deadline"]) == (4, 2, 2, 1)
    assert s["errors_by_status"] == {"429": 1, "exc:ReadError": 1}
    assert s["error_codes"] == {"server_busy": 1}
    assert s["stall_free_fraction"] == 0.5
    assert s["ttfa_p50_s"] == pytest.approx(0.6)
    assert s["audio_s"] == pytest.approx(4.0)
    assert s["audio_s_per_s"] == pytest.approx(0.4)
    assert s["length_match_fraction"] == 1.0


def test_throughput_counts_only_audio_received_within_the_window():
    # sent at 8 s into the level; chunks at +1 (inside a 10 s window) and +3 (outside)
    r = _stream([1.0, 3.0], [2.0, 2.0], sent_at=8.0)
    s = summarize([r], window_s=10.0)
    assert s["audio_s_per_s"] == pytest.approx(0.2)
    assert s["audio_s_per_s_incl_drain"] == pytest.approx(4.0 / 11.0)


def test_length_check_allows_dropped_tokens_but_not_a_cut_stream():
    check = LengthCheck(tolerance_s=0.5, min_ratio=0.7)
    assert check.matches(10.0, 10.0) and check.matches(7.5, 10.0)
    assert not check.matches(3.0, 10.0)          # a stream cut short
    assert not check.matches(11.0, 10.0)         # longer than the cap allows
    s = summarize([_stream([0.1], [3.0], expected=10.0)], window_s=5.0, length_check=check)
    assert s["length_match_fraction"] == 0.0 and s["audio_to_cap_ratio_p50"] == pytest.approx(0.3)


def test_non_streaming_results_have_no_stall_fraction():
    r = _stream([2.0], [3.0])
    r.stream = False
    assert summarize([r], window_s=5.0)["stall_free_fraction"] is None


# -- texts and caps ----------------------------------------------------------------------------------------

def test_texts_are_a_fixed_mixed_list():
    lengths = [len(t) for t in TEXTS]
    assert len(TEXTS) == 40 and min(lengths) >= 6 and max(lengths) <= 250
    assert all(t == " ".join(t.split()) and t[0].isupper() and t[-1] in ".!?," for t in TEXTS)


def test_cap_is_two_seconds_plus_per_character_below_max_new_tokens():
    assert capped_tokens(100, 1000, 0.07) == math.ceil(25 * 9.0)
    assert capped_tokens(100, 50, 0.07) == 50
    assert capped_tokens(100, 300, 0.0) == 300
    assert capped_audio_s("x" * 100, max_new_tokens=1000, max_seconds_per_char=0.07, max_chunk_chars=300) == 9.0
    assert capped_audio_s("x" * 100, max_new_tokens=1000, max_seconds_per_char=0.07, max_chunk_chars=80) is None


# -- Prometheus -----------------------------------------------------------------------------------------------

_SCRAPE = """# HELP ray_chatterbox_t3_busy_seconds_total Wall time
# TYPE ray_chatterbox_t3_busy_seconds_total counter
ray_chatterbox_t3_busy_seconds_total{backend="engine",replica="a"} 1.5
ray_chatterbox_t3_busy_seconds_total{backend="engine",replica="b"} 0.5
ray_chatterbox_audio_seconds_total{stage="router"} 40.0
ray_chatterbox_s3gen_batch_seconds_sum{backend="engine"} 3.0
ray_chatterbox_streams_total{stall_free="true",note="a \\"quoted\\" label"} 7
"""


def test_prometheus_names_compare_without_ray_prefix_or_repeated_total():
    samples = prom.parse(_SCRAPE)
    assert prom.total(samples, "chatterbox_t3_busy_seconds_total") == 2.0
    assert prom.total(samples, "chatterbox_t3_busy_seconds_total_total") == 2.0
    assert prom.total(samples, "chatterbox_audio_seconds_total", {"stage": "router"}) == 40.0
    assert prom.total(samples, "chatterbox_audio_seconds_total", {"stage": "t3"}) is None
    assert prom.total(samples, "chatterbox_streams_total", {"stall_free": "true"}) == 7


def test_engine_means_are_exact_sums_over_histogram_counts():
    from bench.system.levels import engine_stats

    # 4 S3Gen steps of 0.21, 0.22, 0.23, 0.24 s: busy counter 0.9 s; Ray's _sum from bucket midpoints says 1.5
    scrape = ("ray_chatterbox_s3gen_busy_seconds_total{backend=\"engine\"} %s\n"
              "ray_chatterbox_s3gen_batch_seconds_count{backend=\"engine\"} %s\n"
              "ray_chatterbox_s3gen_batch_seconds_sum{backend=\"engine\"} %s\n"
              "ray_chatterbox_t3_step_requests_total{backend=\"engine\"} %s\n"
              "ray_chatterbox_t3_batch_size_count{backend=\"engine\"} %s\n")
    stats = engine_stats(prom.parse(scrape % (0.0, 0, 0.0, 0, 0)), prom.parse(scrape % (0.9, 4, 1.5, 30, 20)))
    assert stats["s3gen_step_mean_s"] == pytest.approx(0.225) and stats["s3gen_steps"] == 4
    assert stats["t3_batch_mean"] == pytest.approx(1.5)
    assert stats["s3gen_batch_mean"] is None        # its counter is missing: no number made up


def test_first_existing_candidate_gives_the_delta():
    before = prom.parse(_SCRAPE)
    after = prom.parse(_SCRAPE.replace("} 3.0", "} 5.5"))
    d, name = prom.first_delta(before, after, [("chatterbox_s3gen_busy_seconds_total", None),
                                               ("chatterbox_s3gen_batch_seconds_sum", None)])
    assert (d, name) == (2.5, "chatterbox_s3gen_batch_seconds_sum")
    assert prom.delta(after, before, "chatterbox_s3gen_batch_seconds_sum") is None   # went down: restarted
    assert prom.delta(None, after, "chatterbox_s3gen_batch_seconds_sum") is None


# -- deploy-file overrides --------------------------------------------------------------------------------------

def test_overrides_go_below_the_apps_args_and_leave_the_original_alone():
    raw = {"applications": [{"name": "chatterbox", "args": {"router": {"max_ongoing_requests": 64}}}]}
    new = with_overrides(raw, dict([parse_override("router.settings.max_seconds_per_char=0.07"),
                                    parse_override("watermark=false")]))
    args = new["applications"][0]["args"]
    assert args["router"] == {"max_ongoing_requests": 64, "settings": {"max_seconds_per_char": 0.07}}
    assert args["watermark"] is False
    assert "settings" not in raw["applications"][0]["args"]["router"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("watermark")


def test_an_s3gen_user_config_override_goes_where_the_deploy_file_keeps_it(tmp_path):
    """deploy/gpu-1x.yaml keeps S3Gen's user_config in its `deployments:` list: `--set s3gen.user_config.X=Y`
    changes it there (not a second user_config under args, which the loader refuses), and the file loads."""
    import yaml

    from serve_app.serving.config import load_deploy_file

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "gpu-1x.yaml").read_text())
    new = with_overrides(raw, dict([parse_override("s3gen.user_config.first_step_cover=1.0"),
                                    parse_override("s3gen.deliver_per_call=false")]))
    app = new["applications"][0]
    assert "user_config" not in app["args"]["s3gen"] and app["args"]["s3gen"]["deliver_per_call"] is False
    entry = next(d for d in app["deployments"] if d["name"] == "S3GenStage")
    assert entry["user_config"]["first_step_cover"] == 1.0 and entry["user_config"]["urgent_steps"] == 3
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(new))
    assert load_deploy_file(path).config.s3gen.user_config.first_step_cover == 1.0


# -- the load generator against a fake app ----------------------------------------------------------------------

def _fake_app(request: httpx.Request) -> httpx.Response:
    if json.loads(request.read())["seed"] == 1:
        return httpx.Response(429, headers={"Retry-After": "0"},
                              json={"error": {"message": "busy", "type": "rate_limit", "code": "server_busy"}})

    async def pcm():   # 0.1 s of PCM in two reads, as a stream arrives
        yield b"\0\0" * 1200
        yield b"\0\0" * 1200

    return httpx.Response(200, content=pcm())


def test_closed_loop_and_fixed_batch_record_every_request():
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(_fake_app), base_url="http://app") as client:
            spec = lambda i: RequestSpec(text="Hello there.", stream=True, seed=i, expected_audio_s=0.1)  # noqa: E731
            results, _ = await closed_loop(client, spec, concurrency=2, duration_s=0.2, hard_deadline_s=5,
                                           model="chatterbox", retry_after_max_s=0.01)
            batch = await fixed_batch(client, [spec(i) for i in range(3)], concurrency=2, hard_deadline_s=5,
                                      model="chatterbox")
            return results, batch

    results, batch = asyncio.run(go())
    assert len(results) >= 2 and any(r.status == 429 for r in results)
    ok = [r for r in results if r.ok]
    assert ok and all(r.audio_s == pytest.approx(0.1) and r.ttfa_s is not None for r in ok)
    assert next(r for r in results if r.status == 429).error_code == "server_busy"
    assert sorted(str(r.status) for r in batch) == ["200", "200", "429"]


def test_markdown_has_a_row_per_level_and_names_skipped_levels():
    from bench.system.report import markdown

    level = {"load": "closed", "concurrency": 8, "stream": True, **summarize([_stream([0.5], [1.0])], window_s=2.0),
             "gpu_peak_mib": 1234, "stage_gpu_ms_per_audio_s": {"t3": 12.5, "s3gen": None}}
    md = markdown({"levels": [level], "upstream": {"audio_s_per_s": 0.25},
                   "skipped_levels": [{"load": "closed", "concurrency": 256, "stream": True, "reason": "no time"}]})
    row = next(line for line in md.splitlines() if line.startswith("| 8 |"))
    assert "| 0.5 | 2.0x |" in row and "| 1234 | 12.5 | - |" in row
    assert "Skipped: 256 stream (no time)" in md


def test_markdown_has_a_stall_line_per_streaming_level():
    from bench.system.report import markdown

    stalled = summarize([_stream([0.0, 1.5], [1.0, 1.0]), _stream([0.0, 0.5, 2.5], [1.0, 1.0, 1.0], index=1),
                         _stream([0.0, 0.5, 1.0], [1.0, 1.0, 1.0], index=2)], window_s=5.0)
    calm = summarize([_stream([0.5], [1.0])], window_s=5.0)
    levels = [{"name": "c32-stream", "load": "closed", "concurrency": 32, "stream": True, **stalled},
              {"name": "c8-stream", "load": "closed", "concurrency": 8, "stream": True, **calm},
              {"name": "c8-nostream", "load": "closed", "concurrency": 8, "stream": False, **calm}]
    lines = [line for line in markdown({"levels": levels}).splitlines() if "streams stalled" in line]
    assert lines == ["- c32: 2 of 3 streams stalled; first late chunk #1: 1, #2: 1; played 1.5 s (p50) when it "
                     "first waited, 2.0 s after first audio; 1.0 stalls each.",
                     "- c8: 0 of 1 streams stalled."]


def test_levels_that_do_not_fit_the_budget_are_skipped_and_reported():
    from types import SimpleNamespace

    from bench.system.levels import Budget, plan_levels, run_levels

    a = SimpleNamespace(levels=[1, 8], nostream_levels=[8], rate=[2.0], duration_s=20.0, max_drain_s=30.0,
                        metrics_settle_s=1.0, warmup_requests=0)
    assert [lv["name"] for lv in plan_levels(a)] == ["c1-stream", "c8-stream", "c8-nostream", "rate2-stream"]

    class FakeRunner:
        base_url = "http://app"

        def __init__(self):
            self.ran = []

        async def run(self, client, level, hard_deadline_s):
            self.ran.append((level["name"], hard_deadline_s))
            budget.deadline -= 40.0   # each level uses 40 s of the budget
            return {**level, "e2e_p99_s": 5.0}

    budget = Budget(45.0 + 80.0)   # 80 s after the teardown reserve: two levels of ~31 s, not a third
    runner, result, calls = FakeRunner(), {"levels": [], "skipped_levels": []}, []
    asyncio.run(run_levels(a, runner, budget, result, lambda: calls.append(1)))
    assert [name for name, _ in runner.ran] == ["c1-stream", "c8-stream"]
    assert runner.ran[0][1] == pytest.approx(50.0)   # duration + drain, within the budget
    assert [s["name"] for s in result["skipped_levels"]] == ["c8-nostream", "rate2-stream"]
    assert len(result["levels"]) == 2 and len(calls) == 2


def test_first_audio_phases_are_level_means_and_get_a_table():
    from bench.system.levels import _r, first_audio_phases
    from bench.system.report import markdown

    # the exact sums are the counters; the histograms' _sum (Ray rebuilds it from bucket midpoints) is not read
    scrape = ("ray_chatterbox_first_audio_phase_seconds_total{phase=\"t3_first_token\"} %s\n"
              "ray_chatterbox_first_audio_phase_seconds_count{phase=\"t3_first_token\"} %s\n"
              "ray_chatterbox_first_audio_phase_seconds_sum{phase=\"t3_first_token\"} %s\n"
              "ray_chatterbox_first_audio_phase_seconds_total{phase=\"router\"} %s\n"
              "ray_chatterbox_first_audio_phase_seconds_count{phase=\"router\"} %s\n")
    before = prom.parse(scrape % (1.0, 10, 0.75, 0.5, 10))
    after = prom.parse(scrape % (1.6, 14, 1.05, 0.7, 14))
    phases = first_audio_phases(before, after)
    assert phases["t3_first_token"] == pytest.approx(0.15) and phases["router"] == pytest.approx(0.05)
    assert phases["vocode"] is None          # not exported: no number made up
    assert _r({"engine": {"t3": 0.12345, "vocode": None}}) == {"engine": {"t3": 0.123, "vocode": None}}   # the log line
    level = {"load": "closed", "concurrency": 8, "stream": True, **summarize([_stream([0.5], [1.0])], window_s=2.0),
             "engine": {"first_audio_phase_mean_s": phases}}
    md = markdown({"levels": [level, {**level, "stream": False}]})
    rows = [line for line in md.splitlines() if line.startswith("| 8 |") and "150" in line]
    assert len(rows) == 1 and rows[0].endswith("| 50 |") and "| - |" in rows[0]


def test_engine_ratios_from_the_counters():
    """KV read per held (T3), and what the flow ran per new token (S3Gen), from the counters' deltas."""
    from bench.system.levels import engine_stats

    scrape = ("ray_chatterbox_t3_kv_positions_read_total{backend=\"engine\"} %s\n"
              "ray_chatterbox_t3_kv_positions_used_total{backend=\"engine\"} %s\n"
              "ray_chatterbox_s3gen_speech_tokens_total{backend=\"engine\"} %s\n"
              "ray_chatterbox_s3gen_flow_row_tokens_total{backend=\"engine\"} %s\n"
              "ray_chatterbox_s3gen_flow_padded_tokens_total{backend=\"engine\"} %s\n"
              "ray_chatterbox_s3gen_flow_calls_total{backend=\"engine\"} %s\n"
              "ray_chatterbox_s3gen_batch_seconds_count{backend=\"engine\"} %s\n")
    stats = engine_stats(prom.parse(scrape % (100, 50, 10, 40, 50, 3, 2)),
                         prom.parse(scrape % (4100, 1050, 110, 340, 400, 13, 6)))
    assert stats["t3_kv_read_ratio"] == pytest.approx(4.0)
    assert stats["s3gen_row_tokens_per_new_token"] == pytest.approx(3.0)
    assert stats["s3gen_padded_tokens_per_new_token"] == pytest.approx(3.5)
    assert stats["s3gen_flow_padding_ratio"] == pytest.approx(350 / 300)
    assert stats["s3gen_flow_calls_per_step"] == pytest.approx(2.5)   # 10 calls over 4 steps


def test_steps_per_text_chunk_by_reason_from_the_counters():
    from bench.system.levels import engine_stats

    line = "ray_chatterbox_s3gen_stream_steps_total{backend=\"engine\",reason=\"%s\"} %s\n"
    before = prom.parse(line % ("first", 5) + line % ("urgent", 2))
    after = prom.parse(line % ("first", 9) + line % ("urgent", 10) + line % ("final", 4) + line % ("one-shot", 4))
    by = engine_stats(before, after)["s3gen_steps_per_chunk_by_reason"]
    # 8 chunks over the level (4 first steps, 4 one-shot): 1 urgent step each, half a final one
    assert by == {"first": 0.5, "target": None, "urgent": 1.0, "final": 0.5, "one-shot": 0.5}


def test_chunks_by_finish_from_the_counter_and_its_markdown_line():
    from bench.system.levels import engine_stats
    from bench.system.report import markdown

    line = "ray_chatterbox_s3gen_chunks_total{backend=\"engine\",finish=\"%s\"} %s\n"
    before = prom.parse(line % ("length", 10))
    after = prom.parse(line % ("length", 70) + line % ("stop", 2))
    by = engine_stats(before, after)["s3gen_chunks_by_finish"]
    assert by == {"stop": 2, "length": 60, "incomplete": None}
    level = {"concurrency": 8, "stream": True, "requests": 30, "ok": 30, "errors": 0, "engine":
             {"s3gen_chunks_by_finish": by}}
    md = markdown({"levels": [level], "upstream": {}})
    assert "Text chunks by how T3 ended them" in md and "8 stream: stop 2, length 60." in md
    assert "Text chunks by how T3 ended them" not in markdown({"levels": [{**level, "engine": {}}], "upstream": {}})
