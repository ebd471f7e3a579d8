"""Every chatterbox_* metric, declared once through `ray.serve.metrics` (exported by Ray's metrics agent).

Names follow Prometheus conventions: `chatterbox_<stage>_<what>_<unit>`, base units, counters end in `_total`.
Ray Serve adds `deployment`, `replica` and `application` tags to each series. Metric objects are created
lazily on first use, inside the replica process (Ray metrics need a connected worker).

Ray exports a histogram's `_sum` rebuilt from its buckets' midpoints (ray/_private/telemetry/
open_telemetry_metric_recorder.py), not the observed values: a mean from `_sum / _count` is only as good as the
buckets. Where a mean matters (the bench reads them), a `*_total` counter beside the histogram keeps the exact sum;
with the histogram's `_count` it gives the exact mean.
"""
from __future__ import annotations

from functools import lru_cache

from ray.serve import metrics as serve_metrics

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
STEP_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TOKEN_BOUNDARIES = [25, 50, 100, 250, 500, 1000, 2000, 4000, 8000, 16000]


class Metrics:
    """The project's metrics. Get the process-wide instance with `get_metrics()`."""

    def __init__(self) -> None:
        H, C, G = serve_metrics.Histogram, serve_metrics.Counter, serve_metrics.Gauge
        # request level (router)
        self.request_duration_seconds = H(
            "chatterbox_request_duration_seconds", "Speech request wall time, end to end.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route", "stream", "status"))
        self.time_to_first_audio_seconds = H(
            "chatterbox_time_to_first_audio_seconds", "From request arrival to the first audio bytes.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route", "stream"))
        self.first_audio_phase_seconds = H(
            "chatterbox_first_audio_phase_seconds", "Where a stream's time to first audio went: in the S3Gen "
            "replica (conds; until T3's first token block: t3_first_token: T3 waiting for a slot and prefilling, "
            "t3_first_block: decoding the rest of the block, t3_call: the calls' hops there and back; "
            "vocode_wait: for the vocoder loop, vocode: the first step) and the rest (router: HTTP, text, the "
            "stage calls' hops, encoding).",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("phase",))
        self.first_audio_phase_seconds_total = C(
            "chatterbox_first_audio_phase_seconds_total", "The exact sum of chatterbox_first_audio_phase_seconds "
            "(its histogram's _sum is rebuilt from bucket midpoints).", tag_keys=("phase",))
        self.audio_seconds_total = C(
            "chatterbox_audio_seconds_total", "Seconds of audio produced.", tag_keys=("stage",))
        self.requests_total = C(
            "chatterbox_requests_total", "Requests finished, by outcome.", tag_keys=("route", "status"))
        self.streams_total = C(
            "chatterbox_streams_total", "Streamed speech responses finished, by whether every audio piece came "
            "before a listener starting at the first one needed it.", tag_keys=("stall_free",))
        # T3
        self.t3_request_seconds = H(
            "chatterbox_t3_request_seconds", "T3 generation time for one text chunk.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("backend",))
        self.t3_step_seconds = H(
            "chatterbox_t3_step_seconds", "One T3 engine decode step (all running requests).",
            boundaries=STEP_BOUNDARIES_S, tag_keys=("backend",))
        self.t3_batch_size = H(
            "chatterbox_t3_batch_size", "Requests in a T3 batch or engine step.",
            boundaries=BATCH_BOUNDARIES, tag_keys=("backend",))
        self.t3_busy_seconds_total = C(
            "chatterbox_t3_busy_seconds_total", "Wall time of T3 engine steps (the replica's GPU-busy time).",
            tag_keys=("backend",))
        self.t3_batch_occupancy_ratio = H(
            "chatterbox_t3_batch_occupancy_ratio", "Requests in a T3 engine step / the replica's KV slots.",
            boundaries=[0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], tag_keys=("backend",))
        self.t3_step_requests_total = C(
            "chatterbox_t3_step_requests_total", "Requests in T3 engine steps, summed over the steps (/ the steps: "
            "the exact mean of chatterbox_t3_batch_size).", tag_keys=("backend",))
        self.t3_step_occupancy_total = C(
            "chatterbox_t3_step_occupancy_total", "chatterbox_t3_batch_occupancy_ratio summed over the steps (/ the "
            "steps: its exact mean).", tag_keys=("backend",))
        self.t3_kv_positions_read_total = C(
            "chatterbox_t3_kv_positions_read_total", "KV cache positions T3's decode attention read, summed over "
            "steps: cache rows x the step's KV-length bucket (masked), or each row's own length (padded keys) "
            "(/ chatterbox_t3_kv_positions_used_total: the padding read).", tag_keys=("backend",))
        self.t3_kv_positions_used_total = C(
            "chatterbox_t3_kv_positions_used_total", "KV cache positions the running requests held (two rows each), "
            "summed over decode steps.", tag_keys=("backend",))
        self.t3_speech_tokens_total = C(
            "chatterbox_t3_speech_tokens_total", "Speech tokens generated.", tag_keys=("backend",))
        self.t3_queue_depth = G(
            "chatterbox_t3_queue_depth", "T3 requests admitted to this replica and not finished.",
            tag_keys=("backend",))
        # S3Gen
        self.s3gen_batch_seconds = H(
            "chatterbox_s3gen_batch_seconds", "One S3Gen engine step.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("backend",))
        self.s3gen_batch_size = H(
            "chatterbox_s3gen_batch_size", "Streams and one-shot jobs in one S3Gen engine step.", boundaries=BATCH_BOUNDARIES,
            tag_keys=("backend",))
        self.s3gen_batch_tokens = H(
            "chatterbox_s3gen_batch_tokens", "New speech tokens in one S3Gen engine step.", boundaries=TOKEN_BOUNDARIES,
            tag_keys=("backend",))
        self.s3gen_step_streams_total = C(
            "chatterbox_s3gen_step_streams_total", "Streams and one-shot jobs in S3Gen engine steps, summed over the "
            "steps (/ the steps: the exact mean of chatterbox_s3gen_batch_size).", tag_keys=("backend",))
        self.s3gen_busy_seconds_total = C(
            "chatterbox_s3gen_busy_seconds_total", "Wall time of S3Gen engine steps (the replica's GPU-busy time).",
            tag_keys=("backend",))
        self.s3gen_speech_tokens_total = C(
            "chatterbox_s3gen_speech_tokens_total", "New speech tokens vocoded (each produced token once).",
            tag_keys=("backend",))
        self.s3gen_flow_tokens_total = C(
            "chatterbox_s3gen_flow_tokens_total", "Speech tokens run through the flow, left context and "
            "look-ahead included, voice prompt excluded (/ speech tokens: vocoded per produced token).",
            tag_keys=("backend",))
        self.s3gen_flow_padded_tokens_total = C(
            "chatterbox_s3gen_flow_padded_tokens_total", "Row-tokens the flow computed, voice prompt and padding "
            "included (/ chatterbox_s3gen_flow_row_tokens_total: the padding overhead).", tag_keys=("backend",))
        self.s3gen_flow_row_tokens_total = C(
            "chatterbox_s3gen_flow_row_tokens_total", "Tokens of the rows the flow ran, voice prompt included "
            "(what it had to compute, without padding).", tag_keys=("backend",))
        self.s3gen_flow_calls_total = C(
            "chatterbox_s3gen_flow_calls_total", "Flow calls: a step's rows are split into calls by length, each a "
            "fixed cost (/ steps: calls per step; engine/s3gen/batching.py).", tag_keys=("backend",))
        self.s3gen_graph_captures_total = C(
            "chatterbox_s3gen_graph_captures_total", "CUDA graphs captured by S3Gen while serving (each holds up "
            "a step; warm-up captures are not counted).", tag_keys=("backend",))
        self.s3gen_first_steps_total = C(
            "chatterbox_s3gen_first_steps_total", "Streams' first vocoder steps by the rule that sized them: asked "
            "(the router's first_chunk_tokens), light (an idle replica's light_first_step_tokens), grown "
            "(first_step_cover under long steps).", tag_keys=("backend", "size"))
        self.s3gen_stream_steps_total = C(
            "chatterbox_s3gen_stream_steps_total", "Text chunks' rows in vocoder steps, by why each ran (the "
            "scheduler's rule): first, target (its step size reached), urgent (its listener ran low), final (T3 "
            "done), one-shot. Rows per text chunk: the sum over first + one-shot.", tag_keys=("backend", "reason"))
        self.s3gen_chunks_total = C(
            "chatterbox_s3gen_chunks_total", "Text chunks the S3Gen replica finished, by how T3 ended them: stop "
            "(T3 sampled its stop token), length (the chunk's token cap), incomplete (the chunk ended first: client "
            "gone, a stage failed). A short response with finish=stop is the model's choice, not lost audio.",
            tag_keys=("backend", "finish"))
        self.s3gen_queue_depth = G(
            "chatterbox_s3gen_queue_depth", "Text chunks (streams) open in this replica.",
            tag_keys=("backend",))
        # voices
        self.voice_enroll_seconds = H(
            "chatterbox_voice_enroll_seconds", "Time to enroll one voice.", boundaries=LATENCY_BOUNDARIES_S)
        self.voice_cache_lookups_total = C(
            "chatterbox_voice_cache_lookups_total", "Conditionals cache lookups in a stage.", tag_keys=("stage", "result"))
        # GPU memory (per replica; updated periodically)
        self.gpu_memory_allocated_bytes = G(
            "chatterbox_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated of this replica.",
            tag_keys=("stage",))
        self.gpu_memory_reserved_bytes = G(
            "chatterbox_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved of this replica.", tag_keys=("stage",))
        self.gpu_memory_budget_bytes = G(
            "chatterbox_gpu_memory_budget_bytes", "This replica's share of its GPU (num_gpus x total memory).",
            tag_keys=("stage",))


@lru_cache(maxsize=1)
def get_metrics() -> Metrics:
    return Metrics()
