"""Streaming through S3GenEngine.vocode_stream_step: joined chunks ~ one-shot decode, and no clicks at joins."""
from __future__ import annotations

import numpy as np
import pytest

from s3gen_helpers import one_thread, fresh_s3gen, log_spectral_distance, random_tokens, random_voice  # noqa: F401  (one_thread: autouse fixture)
from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig, VocodeInput
from serve_app.contracts import StreamState

# Stated tolerance (random tiny weights, 3 CFM steps): stream vs one-shot LSD < 3 dB (measured ~1.4 dB; the
# same tokens with another seed are ~7 dB apart). Clicks: every join's sample-to-sample jump <= the p99 jump.
MAX_LSD_DB = 3.0
NUM_TOKENS = 40
CHUNK_TOKENS = 10


@pytest.fixture(scope="module")
def engine():
    return S3GenEngine(fresh_s3gen("tiny"), S3GenEngineConfig(n_cfm_timesteps=3, length_bucket=16))


def _stream(engine, tokens, conds, seed, chunk):
    state, pieces = None, []
    for end in range(chunk, len(tokens) + chunk, chunk):
        finalize = end >= len(tokens)
        audio, state = engine.vocode_stream_step(tokens[:min(end, len(tokens))], conds, state, finalize, seed=seed)
        assert audio.dtype == np.float32 and np.isfinite(audio).all()
        pieces.append(audio)
        if finalize:
            break
    return pieces, state


@pytest.fixture(scope="module")
def decoded(engine):
    tokens, conds = random_tokens(NUM_TOKENS, 7), random_voice(8, 7)
    one_shot = engine.vocode([VocodeInput(tokens, conds, seed=3)])[0]
    other_seed = engine.vocode([VocodeInput(tokens, conds, seed=4)])[0]
    pieces, state = _stream(engine, tokens, conds, 3, CHUNK_TOKENS)
    return one_shot, other_seed, pieces, state


def test_stream_joined_matches_one_shot_length_and_spectrum(decoded):
    one_shot, other_seed, pieces, state = decoded
    joined = np.concatenate(pieces)
    assert joined.size == one_shot.size == 960 * NUM_TOKENS
    assert state.num_samples_emitted == joined.size
    assert sum(p.size > 0 for p in pieces) >= 3          # it really streamed
    lsd = log_spectral_distance(joined, one_shot)
    assert lsd < MAX_LSD_DB, lsd
    assert log_spectral_distance(other_seed, one_shot) > 2 * lsd   # the measure does discriminate


def test_stream_has_no_clicks_at_joins(decoded):
    pieces = decoded[2]
    joined = np.concatenate(pieces)
    jumps = np.abs(np.diff(joined))
    typical = np.percentile(jumps, 99)
    joins = np.cumsum([p.size for p in pieces])[:-1]
    joins = joins[(joins > 2) & (joins < joined.size - 2)]
    assert joins.size >= 2
    for j in joins:
        assert jumps[j - 2:j + 2].max() <= typical, (j, jumps[j - 2:j + 2].max(), typical)


def test_stream_first_call_can_be_empty_and_state_roundtrips(engine):
    conds = random_voice(6, 9)
    # 4 tokens: 3 held back for look-ahead, 2 frames left < the overlap: nothing to emit yet
    audio, state = engine.vocode_stream_step(random_tokens(4, 9), conds, StreamState(), False)
    assert audio.size == 0 and state.num_samples_emitted == 0
