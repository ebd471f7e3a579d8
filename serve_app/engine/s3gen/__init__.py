"""S3Gen engine: batched, half-precision, quantizable speech tokens -> 24 kHz audio (plain torch)."""
from .conds import conditionals_to_voice_conds, gen_dict_from_voice_conds, voice_conds_to_conditionals
from .config import SAMPLE_RATE, SAMPLES_PER_TOKEN, S3GenEngineConfig, VocodeInput
from .batching import plan_batches
from .engine import S3GenEngine
from .stats import S3GenEngineStats
from .streaming import StreamState
from serve_app.model.strip import strip_enrollment_modules

__all__ = [
    "S3GenEngine", "S3GenEngineConfig", "S3GenEngineStats", "StreamState", "VocodeInput", "plan_batches",
    "strip_enrollment_modules",
    "voice_conds_to_conditionals", "conditionals_to_voice_conds", "gen_dict_from_voice_conds",
    "SAMPLE_RATE", "SAMPLES_PER_TOKEN",
]
