"""Audio encoding, tempo change and crossfades: every format decodes back to the audio that went in."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from serve_app.serving.audio import (
    AudioEncoder,
    Crossfader,
    TimeStretcher,
    atempo_chain,
    change_speed,
    decode_upload,
    encode_audio,
    to_wav_bytes,
)
from serve_app.serving.errors import UnsupportedMediaError

SR = 24_000


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode_any(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Decodes with PyAV (soundfile for wav, raw for pcm); returns (mono float32, sample rate)."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0, SR
    if fmt == "wav":
        samples, sr = sf.read(io.BytesIO(data), dtype="float32")
        return samples, sr
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.codec_context.sample_rate)
        parts = [out.to_ndarray().reshape(-1) for frame in c.decode(stream) for out in resampler.resample(frame)]
        parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        return np.concatenate(parts).astype(np.float32), stream.codec_context.sample_rate


# Codec padding/priming: mp3 adds ~1-2 frames of 1152, aac 1024 priming + a partial frame.
TOLERANCE_S = {"mp3": 0.1, "aac": 0.1, "opus": 0.03, "flac": 0.0, "wav": 0.0, "pcm": 0.0}
ALL_FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("streaming", [False, True])
def test_every_format_decodes_back_at_the_right_length(fmt, streaming):
    audio = tone(1.5)
    encoder = AudioEncoder(fmt, streaming=streaming)
    data = b"".join(encoder.encode(audio[i:i + 4800]) for i in range(0, audio.size, 4800)) + encoder.finish()
    decoded, sr = decode_any(data, fmt)
    duration = decoded.size / sr
    assert abs(duration - 1.5) <= TOLERANCE_S[fmt] + 1e-9, (fmt, duration)
    if fmt == "opus":
        assert sr == 48_000  # opus always decodes at 48 kHz; the stream was encoded from 24 kHz input
        with av.open(io.BytesIO(data)) as c:
            assert c.streams.audio[0].codec_context.layout.nb_channels == 1
    else:
        assert sr == SR


@pytest.mark.parametrize("fmt", ["flac", "wav", "pcm"])
def test_lossless_formats_keep_the_samples(fmt):
    audio = tone(0.5)
    decoded, _ = decode_any(encode_audio(audio, fmt), fmt)
    np.testing.assert_allclose(decoded, audio, atol=2 / 32767)


def test_streaming_mp3_emits_bytes_before_the_end():
    encoder = AudioEncoder("mp3", streaming=True)
    first = encoder.encode(tone(0.5))
    assert len(first) > 0


def test_streaming_opus_emits_bytes_before_the_end():
    encoder = AudioEncoder("opus", streaming=True)
    out = b"".join(encoder.encode(piece) for piece in np.split(tone(1.0), 10))
    assert len(out) > 1000  # pages flushed during the stream, not only ogg headers


def test_one_shot_wav_header_has_exact_sizes():
    data = encode_audio(tone(1.0), "wav")
    assert len(data) == 44 + SR * 2
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (SR, 1, SR, "PCM_16")


def test_pcm_is_raw_int16_little_endian():
    data = encode_audio(np.array([0.0, 1.0, -1.0, 0.5], np.float32), "pcm")
    assert np.frombuffer(data, "<i2").tolist() == [0, 32767, -32767, 16384]


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="response_format"):
        AudioEncoder("ogg")


@pytest.mark.parametrize("speed", [0.25, 0.5, 1.0, 1.5, 2.0, 4.0])
def test_speed_changes_duration_not_pitch(speed):
    audio = tone(2.0, freq=300.0)
    out = change_speed(audio, speed)
    assert abs(out.size / (audio.size / speed) - 1) < 0.02
    # the pitch stays: the dominant frequency is still ~300 Hz
    spectrum = np.abs(np.fft.rfft(out[: SR // 2]))
    peak_hz = np.argmax(spectrum) * SR / (SR // 2)
    assert abs(peak_hz - 300.0) < 10.0


def test_streamed_stretch_matches_total_duration():
    audio = tone(3.0)
    stretcher = TimeStretcher(2.0)
    out = np.concatenate([stretcher.push(p) for p in np.split(audio, 30)] + [stretcher.flush()])
    assert abs(out.size - audio.size / 2) < 0.02 * audio.size / 2


def test_atempo_chain_stays_in_range():
    for speed in (0.25, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0):
        chain = atempo_chain(speed)
        assert all(0.5 <= f <= 2.0 for f in chain)
        assert np.isclose(np.prod(chain), speed)


def test_crossfade_length_and_continuity():
    fade = 480
    segments = [np.full(4800, 1.0, np.float32), np.full(2400, 1.0, np.float32), np.full(3600, 1.0, np.float32)]
    cf = Crossfader(fade)
    out = []
    for seg in segments:
        for piece in np.array_split(seg, 7):
            out.append(cf.push(piece))
        out.append(cf.end_segment())
    out.append(cf.finish())
    joined = np.concatenate(out)
    assert joined.size == sum(s.size for s in segments) - fade * (len(segments) - 1)
    # constant segments crossfaded linearly stay constant: no clicks, no dips
    np.testing.assert_allclose(joined, 1.0, atol=1e-6)


def test_crossfade_mixes_old_into_new():
    cf = Crossfader(4)
    a = cf.push(np.ones(8, np.float32))
    a = np.concatenate([a, cf.end_segment(), cf.push(np.zeros(8, np.float32)), cf.finish()])
    assert a.size == 12
    assert np.all(a[:4] == 1.0) and np.all(np.diff(a[4:8]) < 0) and np.all(a[8:] == 0.0)


def test_zero_crossfade_is_concatenation():
    cf = Crossfader(0)
    out = [cf.push(np.ones(10, np.float32)), cf.end_segment(), cf.push(np.zeros(5, np.float32)), cf.finish()]
    assert np.concatenate(out).size == 15


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus"])
def test_decode_upload_reads_common_formats(fmt):
    audio = tone(2.0)
    samples, sr = decode_upload(encode_audio(audio, fmt))
    assert abs(samples.size / sr - 2.0) < 0.1


def test_decode_upload_rejects_garbage():
    with pytest.raises(UnsupportedMediaError) as info:
        decode_upload(b"this is not audio at all" * 10)
    assert info.value.status_code == 415


def test_to_wav_bytes_round_trips():
    samples, sr = decode_upload(to_wav_bytes(tone(0.3), 16_000))
    assert sr == 16_000 and samples.size == int(0.3 * SR)
