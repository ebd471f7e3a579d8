"""Render k8s/monitoring/grafana-dashboard.json: the Chatterbox serving dashboard, from the panel table below.

    python k8s/monitoring/dashboard.py            # write
    python k8s/monitoring/dashboard.py --check    # exit 1 if the committed JSON is stale

Series are what Prometheus scrapes from Ray's metrics port: each metric declared in serve_app/serving/metrics.py
as `chatterbox_*` is exported by Ray as `ray_chatterbox_*` (histograms as `_bucket`, `_sum`, `_count`), with
the `application`, `deployment` and `replica` labels Ray Serve adds. Ray Serve's own metrics are `ray_serve_*`.
Standard library only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "grafana-dashboard.json"
UID = "chatterbox-serve"
APP = 'application=~"$application"'
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def q(p: float, metric: str, by: str = "", extra: str = "") -> str:
    """A histogram quantile over `ray_<metric>_bucket`, optionally kept apart by labels."""
    sel = ", ".join(x for x in (APP, extra) if x)
    return f"histogram_quantile({p}, sum by (le{', ' + by if by else ''}) (rate(ray_{metric}_bucket{{{sel}}}[{RATE}])))"


def mean(total: str, metric: str, by: str) -> str:
    """The exact mean of histogram `metric`: its `total` counter (the observed values' sum) over its `_count`.
    Not `_sum`: Ray rebuilds a histogram's `_sum` from bucket midpoints (serve_app/serving/metrics.py)."""
    return (f"sum by ({by}) (rate(ray_{total}{{{APP}}}[{RATE}])) / "
            f"sum by ({by}) (rate(ray_{metric}_count{{{APP}}}[{RATE}]))")


# (row title, [(panel title, unit, description, [(expr, legend)])]); each row is two panels of width 12.
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]] = [
    ("Traffic", [
        ("Request rate", "reqps", "Finished speech/voice requests per second, by route and HTTP status.", [
            (f"sum by (route, status) (rate(ray_chatterbox_requests_total{{{APP}}}[{RATE}]))", "{{route}} {{status}}"),
        ]),
        ("Error ratio (5xx)", "percentunit", "Share of finished requests answered with a 5xx status.", [
            (f'sum(rate(ray_chatterbox_requests_total{{{APP}, status=~"5.."}}[{RATE}])) / '
             f"sum(rate(ray_chatterbox_requests_total{{{APP}}}[{RATE}]))", "5xx"),
        ]),
        ("Healthy replicas", "short", "Healthy replicas per deployment, as Ray Serve's controller reports them.", [
            (f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "{{deployment}}"),
        ]),
        ("Ongoing HTTP requests", "short", "Requests in flight in Ray Serve's HTTP proxies, per node.", [
            ("sum by (node_ip_address) (ray_serve_num_ongoing_http_requests)", "{{node_ip_address}}"),
        ]),
    ]),
    ("Latency", [
        ("Request duration", "s", "End-to-end wall time of speech requests (streams: until the last byte).", [
            (q(p, "chatterbox_request_duration_seconds"), f"p{int(p * 100)}") for p in (0.5, 0.95, 0.99)
        ]),
        ("Time to first audio", "s", "From request arrival to the first audio bytes sent, streaming or not.", [
            (q(p, "chatterbox_time_to_first_audio_seconds", "stream"), f"p{int(p * 100)} stream={{{{stream}}}}")
            for p in (0.5, 0.95, 0.99)
        ]),
        ("Stage latency p50 / p95", "s", "T3: one text chunk; S3Gen: one vocoder batch; voice: one enrollment.", [
            (q(p, m), f"{name} p{int(p * 100)}")
            for m, name in (("chatterbox_t3_request_seconds", "t3 chunk"), ("chatterbox_s3gen_batch_seconds", "s3gen batch"),
                            ("chatterbox_voice_enroll_seconds", "voice enroll"))
            for p in (0.5, 0.95)
        ]),
        ("T3 decode step", "s", "One T3 engine decode step over all running requests (engine backend).", [
            (q(p, "chatterbox_t3_step_seconds", "replica"), f"p{int(p * 100)} {{{{replica}}}}") for p in (0.5, 0.95)
        ]),
        ("Time to first audio by phase (mean)", "s", "Where a stream's first audio waits: in the S3Gen replica the "
         "voice's conditionals (conds); T3 until its first token block, as T3 saw it (t3_first_token: a slot and "
         "the prefill; t3_first_block: decoding the rest of the block) and the hops there and back (t3_call); the "
         "vocoder loop (vocode_wait) and the first step (vocode); router: the rest (HTTP, text, the stage calls' "
         "hops, encoding).", [
            (mean("chatterbox_first_audio_phase_seconds_total", "chatterbox_first_audio_phase_seconds", "phase"),
             "{{phase}}"),
        ]),
    ]),
    ("Throughput and batching", [
        ("Audio seconds per second (real-time factor)", "short", "Seconds of audio produced per wall-clock second: "
         "above 1 the service generates faster than real time.", [
            (f"sum(rate(ray_chatterbox_audio_seconds_total{{{APP}}}[{RATE}]))", "audio s / s"),
            (f"sum(rate(ray_chatterbox_t3_speech_tokens_total{{{APP}}}[{RATE}])) / 25",
             "speech tokens / 25 (audio s / s from T3)"),
        ]),
        ("Batch sizes", "short", "Mean requests per T3 batch (or engine step) and jobs per S3Gen batch.", [
            (mean("chatterbox_t3_step_requests_total", "chatterbox_t3_batch_size", "replica"), "t3 {{replica}}"),
            (mean("chatterbox_s3gen_step_streams_total", "chatterbox_s3gen_batch_size", "replica"),
             "s3gen {{replica}}"),
        ]),
        ("S3Gen tokens per batch", "short", "Mean speech tokens vocoded per S3Gen batch (bounded by max_batch_tokens).", [
            (mean("chatterbox_s3gen_speech_tokens_total", "chatterbox_s3gen_batch_tokens", "replica"),
             "{{replica}}"),
        ]),
        ("S3Gen first steps by size", "ops", "Streams' first vocoder steps per second, by the rule that sized "
         "them: asked (the router's first_chunk_tokens), light (an idle replica's shorter first step), grown "
         "(first_step_cover: longer first steps while the replica's steps are long).", [
            (f"sum by (size) (rate(ray_chatterbox_s3gen_first_steps_total{{{APP}}}[{RATE}]))", "{{size}}"),
        ]),
        ("S3Gen steps by reason", "ops", "Text chunks' rows in vocoder steps per second, by why each ran: first, "
         "target (its step size reached), urgent (its listener ran low: small steps that re-run context), final "
         "(T3 done), one-shot.", [
            (f"sum by (reason) (rate(ray_chatterbox_s3gen_stream_steps_total{{{APP}}}[{RATE}]))", "{{reason}}"),
        ]),
        ("Text chunks by how T3 ended them", "ops", "Text chunks finished per second: stop (T3 sampled its stop "
         "token: the speech ended), length (it hit the token cap: speech may be cut short; many of these with real "
         "weights say the cap is too low), incomplete (the client left or a stage failed first).", [
            (f"sum by (finish) (rate(ray_chatterbox_s3gen_chunks_total{{{APP}}}[{RATE}]))", "{{finish}}"),
        ]),
        ("Voice cache lookups", "ops", "Conditionals cache lookups per second in each stage, hits and misses.", [
            (f"sum by (stage, result) (rate(ray_chatterbox_voice_cache_lookups_total{{{APP}}}[{RATE}]))",
             "{{stage}} {{result}}"),
        ]),
    ]),
    ("Served-system efficiency", [
        ("Stage GPU-busy ms per second of audio", "ms", "Wall time of each stage's engine steps per second of "
         "audio delivered (GPU-busy time; both stages share a GPU under time slicing or MPS).", [
            (f"1000 * sum(rate(ray_chatterbox_{st}_busy_seconds_total{{{APP}}}[{RATE}])) / "
             f"sum(rate(ray_chatterbox_audio_seconds_total{{{APP}, stage=\"s3gen\"}}[{RATE}]))", st)
            for st in ("t3", "s3gen")
        ]),
        ("Vocoded tokens per produced token", "short", "Speech tokens run through the flow (left context and "
         "look-ahead included) per new token vocoded: 1.0 is no rework; the whole-prefix design was 2.6.", [
            (f"sum(rate(ray_chatterbox_s3gen_flow_tokens_total{{{APP}}}[{RATE}])) / "
             f"sum(rate(ray_chatterbox_s3gen_speech_tokens_total{{{APP}}}[{RATE}]))", "flow / new"),
        ]),
        ("S3Gen flow padding, calls and graph captures", "short", "Row-tokens the flow computed per row-token its "
         "rows needed (1.0: no padding; rows are grouped into calls by length), flow calls per engine step (each a "
         "fixed cost), and CUDA graphs captured while serving per minute (each holds up a step; warm-up captures "
         "the grid ahead).", [
            (f"sum(rate(ray_chatterbox_s3gen_flow_padded_tokens_total{{{APP}}}[{RATE}])) / "
             f"sum(rate(ray_chatterbox_s3gen_flow_row_tokens_total{{{APP}}}[{RATE}]))", "padded / needed"),
            (f"sum(rate(ray_chatterbox_s3gen_flow_calls_total{{{APP}}}[{RATE}])) / "
             f"sum(rate(ray_chatterbox_s3gen_batch_seconds_count{{{APP}}}[{RATE}]))", "flow calls / step"),
            (f"60 * sum(rate(ray_chatterbox_s3gen_graph_captures_total{{{APP}}}[{RATE}]))", "captures / min"),
        ]),
        ("T3 KV read per KV held", "short", "KV cache positions T3's decode attention read per position its "
         "requests held: the attention traffic spent on padding (1.0: none, decode_attention padded_keys, the "
         "default on CUDA; masked: cache rows x the step's KV-length bucket, the batch's longest request).", [
            (f"sum(rate(ray_chatterbox_t3_kv_positions_read_total{{{APP}}}[{RATE}])) / "
             f"sum(rate(ray_chatterbox_t3_kv_positions_used_total{{{APP}}}[{RATE}]))", "read / held"),
        ]),
        ("Batch occupancy", "percentunit", "T3: requests per engine step / KV slots. S3Gen: streams and one-shot "
         "jobs per engine step (mean, right axis in streams).", [
            (mean("chatterbox_t3_step_occupancy_total", "chatterbox_t3_batch_occupancy_ratio", "replica"),
             "t3 {{replica}}"),
        ]),
        ("Stall-free streams", "percentunit", "Share of streamed responses whose every audio piece arrived before a "
         "listener starting at the first one needed it (the router's view).", [
            (f'sum(rate(ray_chatterbox_streams_total{{{APP}, stall_free="true"}}[{RATE}])) / '
             f"sum(rate(ray_chatterbox_streams_total{{{APP}}}[{RATE}]))", "stall-free"),
        ]),
    ]),
    ("Queues and GPU memory", [
        ("Queue depth", "short", "Waiting for a replica (Ray Serve's queued queries) and admitted to a stage "
         "replica but not finished.", [
            (f"sum by (deployment) (ray_serve_deployment_queued_queries{{{APP}}})", "queued {{deployment}}"),
            (f"sum by (replica) (ray_chatterbox_t3_queue_depth{{{APP}}})", "t3 running {{replica}}"),
            (f"sum by (replica) (ray_chatterbox_s3gen_queue_depth{{{APP}}})", "s3gen running {{replica}}"),
        ]),
        ("VRAM per replica vs budget", "bytes", "torch allocator per GPU replica; the budget is the replica's share "
         "(num_gpus x card memory), which it caps itself to.", [
            (f"max by (stage, replica) (ray_chatterbox_gpu_memory_reserved_bytes{{{APP}}})", "reserved {{replica}}"),
            (f"max by (stage, replica) (ray_chatterbox_gpu_memory_allocated_bytes{{{APP}}})", "allocated {{replica}}"),
            (f"max by (stage, replica) (ray_chatterbox_gpu_memory_budget_bytes{{{APP}}})", "budget {{replica}}"),
        ]),
    ]),
]


def _panel(pid: int, title: str, unit: str, description: str, targets: list[tuple[str, str]], x: int, y: int) -> dict:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     "range": True} for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict] = []
    pid, y = 1, 0
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, (title, unit, description, targets) in enumerate(row):
            panels.append(_panel(pid, title, unit, description, targets, x=12 * (i % 2), y=y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": UID,
        "title": "Chatterbox TTS on Ray Serve",
        "description": "Requests, latency per stage, time to first audio, real-time factor, batching, queues and "
                       "GPU memory of the chatterbox-serve application (k8s/monitoring/dashboard.py).",
        "tags": ["chatterbox", "ray-serve", "tts"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": 41,
        "version": 1,
        "annotations": {"list": []},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus"},
            {"type": "query", "name": "application", "label": "Serve application", "datasource": DATASOURCE,
             "query": "label_values(ray_serve_deployment_replica_healthy, application)", "refresh": 2,
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "chatterbox", "value": "chatterbox"}},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the rendered one")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.name} is stale: run `python k8s/monitoring/dashboard.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
