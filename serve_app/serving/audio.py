"""Audio on the router: encoding to the response formats, tempo change, crossfades, decoding uploads.

Codecs come from PyAV's bundled ffmpeg (libmp3lame, libopus, aac, flac); wav and pcm are written directly.
Everything works on mono float32 numpy arrays in [-1, 1]; no torch.

- `AudioEncoder(fmt, streaming=...)`: `encode(samples) -> bytes`, `finish() -> bytes`. Streaming mode drains
  the muxer after every call (non-seekable sink: flac's STREAMINFO keeps no total, wav declares an unknown size);
  one-shot mode muxes into a seekable buffer so headers are complete.
- `TimeStretcher(speed)`: ffmpeg `atempo` (WSOLA-style tempo change, pitch kept), chained for speeds outside
  [0.5, 2.0]; stateful so streamed pieces join without seams.
- `Crossfader(num_samples)`: joins consecutive segments (text chunks) with a short linear crossfade.
- `decode_upload(data)`: any ffmpeg-readable audio -> mono float32 + sample rate, or UnsupportedMediaError.
"""
from __future__ import annotations

import io
import logging
import struct
from fractions import Fraction

import av
import numpy as np
from av.filter import Graph

from serve_app.contracts import SAMPLE_RATE
from serve_app.serving.errors import UnsupportedMediaError

logger = logging.getLogger(__name__)

MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# response_format -> (container, codec, bit rate or None)
_PYAV_FORMATS = {
    "mp3": ("mp3", "libmp3lame", 64_000),
    "opus": ("ogg", "libopus", 32_000),
    "aac": ("adts", "aac", 64_000),
    "flac": ("flac", "flac", None),
}
_UNKNOWN_SIZE = 0xFFFFFFFF


def to_pcm16(samples: np.ndarray) -> bytes:
    # samples: [N] float32 in [-1, 1] -> N * 2 bytes, int16 little-endian
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


def wav_header(num_samples: int | None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """44-byte PCM16 mono WAV header; `None` declares an unknown (streamed) length, as most TTS servers do."""
    data_size = _UNKNOWN_SIZE if num_samples is None else num_samples * 2
    riff_size = _UNKNOWN_SIZE if num_samples is None else 36 + data_size
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", riff_size, b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                       sample_rate * 2, 2, 16, b"data", data_size)


def _float_frame(samples: np.ndarray, sample_rate: int, pts: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32)[None, :], format="flt",
                                       layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = pts
    frame.time_base = Fraction(1, sample_rate)
    return frame


class _DrainSink:
    """A write-only, non-seekable file for PyAV: bytes are taken out after each encode call."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class AudioEncoder:
    """Encodes mono float32 pieces at `sample_rate` into one `fmt` byte stream."""

    def __init__(self, fmt: str, *, sample_rate: int = SAMPLE_RATE, streaming: bool = False):
        if fmt not in MEDIA_TYPES:
            raise ValueError(f"unknown response_format {fmt!r}; use one of {sorted(MEDIA_TYPES)}")
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.streaming = streaming
        self.media_type = MEDIA_TYPES[fmt]
        self.num_samples = 0
        self._header_sent = False
        self._pcm_parts: list[bytes] = []  # one-shot wav only
        self._container = self._stream = None
        if fmt in _PYAV_FORMATS:
            container_fmt, codec, bit_rate = _PYAV_FORMATS[fmt]
            self._sink = _DrainSink() if streaming else io.BytesIO()
            # Ogg pages are flushed every 20 ms of audio so opus streams out promptly.
            options = {"page_duration": "20000"} if container_fmt == "ogg" else {}
            self._container = av.open(self._sink, mode="w", format=container_fmt, options=options)
            self._stream = self._container.add_stream(codec, rate=sample_rate)
            self._stream.layout = "mono"
            if bit_rate:
                self._stream.bit_rate = bit_rate

    def encode(self, samples: np.ndarray) -> bytes:
        # samples: [N] float32 at sample_rate -> the bytes of the stream that are ready now (may be b"")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        pts = self.num_samples
        self.num_samples += samples.size
        if self.fmt == "pcm":
            return to_pcm16(samples)
        if self.fmt == "wav":
            if not self.streaming:
                self._pcm_parts.append(to_pcm16(samples))
                return b""
            head = b"" if self._header_sent else wav_header(None, self.sample_rate)
            self._header_sent = True
            return head + to_pcm16(samples)
        if samples.size:
            for packet in self._stream.encode(_float_frame(samples, self.sample_rate, pts)):
                self._container.mux(packet)
        return self._sink.drain() if self.streaming else b""

    def finish(self) -> bytes:
        """Flushes the codec and closes the container: the last bytes (one-shot mode: the whole file)."""
        if self.fmt == "pcm":
            return b""
        if self.fmt == "wav":
            if self.streaming:
                return b"" if self._header_sent else wav_header(None, self.sample_rate)
            return wav_header(self.num_samples, self.sample_rate) + b"".join(self._pcm_parts)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.drain() if self.streaming else self._sink.getvalue()

    def close(self) -> None:
        """Releases the container without flushing (error/cancel paths)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - best effort on an abandoned stream
                logger.debug("closing an abandoned %s encoder failed", self.fmt, exc_info=True)
            self._container = None


def encode_audio(samples: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """One-shot: the complete file."""
    encoder = AudioEncoder(fmt, sample_rate=sample_rate, streaming=False)
    return encoder.encode(samples) + encoder.finish()


def atempo_chain(speed: float) -> list[float]:
    """atempo takes one factor in [0.5, 2.0] per stage (keeps quality); chain stages for 0.25..4.0."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    factors = []
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    while speed > 2.0:
        factors.append(2.0)
        speed /= 2.0
    factors.append(speed)
    return factors


class TimeStretcher:
    """Tempo change without pitch change (ffmpeg atempo), fed piece by piece. speed=1 passes samples through."""

    def __init__(self, speed: float, sample_rate: int = SAMPLE_RATE):
        self.speed = speed
        self.sample_rate = sample_rate
        self._pts = 0
        self._graph: Graph | None = None
        if abs(speed - 1.0) < 1e-6:
            return
        graph = Graph()
        node = graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono",
                                 time_base=Fraction(1, sample_rate))
        for factor in atempo_chain(speed):
            stage = graph.add("atempo", f"tempo={factor:.6f}")
            node.link_to(stage)
            node = stage
        sink = graph.add("abuffersink")
        node.link_to(sink)
        graph.configure()
        self._graph = graph

    def _pull(self) -> np.ndarray:
        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        # samples: [N] float32 -> [~N/speed] float32 (the part that is ready; the filter keeps a small window)
        if self._graph is None:
            return np.asarray(samples, dtype=np.float32)
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if samples.size == 0:
            return samples
        self._graph.push(_float_frame(samples, self.sample_rate, self._pts))
        self._pts += samples.size
        return self._pull()

    def flush(self) -> np.ndarray:
        if self._graph is None:
            return np.zeros(0, np.float32)
        self._graph.push(None)
        out = self._pull()
        self._graph = None
        return out


def change_speed(samples: np.ndarray, speed: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    stretcher = TimeStretcher(speed, sample_rate)
    head = stretcher.push(samples)
    return np.concatenate([head, stretcher.flush()])


class Crossfader:
    """Joins segments with a linear crossfade of `num_samples`: each segment's last `num_samples` are held back
    until the next segment starts (or `finish`). Output length = total - num_samples * (segments - 1)."""

    def __init__(self, num_samples: int):
        self.num_samples = max(0, int(num_samples))
        self._tail = np.zeros(0, np.float32)  # held back from the current segment
        self._prev_tail: np.ndarray | None = None  # the previous segment's tail, waiting to be mixed
        self._head = np.zeros(0, np.float32)  # start of the current segment, collected for mixing

    def push(self, samples: np.ndarray) -> np.ndarray:
        # samples: [N] float32, the next piece of the current segment -> samples ready to emit
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.num_samples == 0:
            return samples
        if self._prev_tail is not None:
            self._head = np.concatenate([self._head, samples])
            if self._head.size < self._prev_tail.size:
                return np.zeros(0, np.float32)
            samples, self._head = self._mix(self._prev_tail, self._head), np.zeros(0, np.float32)
            self._prev_tail = None
        joined = np.concatenate([self._tail, samples])
        cut = max(0, joined.size - self.num_samples)
        self._tail = joined[cut:]
        return joined[:cut]

    def end_segment(self) -> np.ndarray:
        """The current segment is complete; its tail waits for the next one. Returns what can be emitted now."""
        if self.num_samples == 0:
            return np.zeros(0, np.float32)
        out = np.zeros(0, np.float32)
        if self._prev_tail is not None:  # a segment shorter than the crossfade: emit as-is, then hold its tail
            out = np.concatenate([self._prev_tail, self._head])
            self._prev_tail, self._head = None, np.zeros(0, np.float32)
            out = self.push(out)
        self._prev_tail, self._tail = self._tail, np.zeros(0, np.float32)
        return out

    def finish(self) -> np.ndarray:
        parts = [p for p in (self._prev_tail, self._head, self._tail) if p is not None]
        self._prev_tail, self._head, self._tail = None, np.zeros(0, np.float32), np.zeros(0, np.float32)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    @staticmethod
    def _mix(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
        # tail: [F], head: [>= F] -> [len(head)]: the first F samples crossfaded, the rest of head unchanged
        n = tail.size
        if n == 0:
            return head
        fade_in = np.linspace(0.0, 1.0, n + 2, dtype=np.float32)[1:-1]
        mixed = head.copy()
        mixed[:n] = tail * (1.0 - fade_in) + head[:n] * fade_in
        return mixed


def decode_upload(data: bytes) -> tuple[np.ndarray, int]:
    """Any audio ffmpeg reads (wav, mp3, flac, ogg, m4a, ...) -> (mono float32 [N], sample_rate)."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise UnsupportedMediaError("The uploaded file has no audio stream.", param="file",
                                            code="unsupported_media")
            stream = container.streams.audio[0]
            sample_rate = stream.codec_context.sample_rate or stream.rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            parts = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except UnsupportedMediaError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError) as exc:
        raise UnsupportedMediaError(
            f"Could not decode the uploaded audio ({exc.__class__.__name__}); send wav, mp3, flac, ogg or m4a.",
            param="file", code="unsupported_media") from exc
    samples = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)
    if samples.size == 0 or not sample_rate:
        raise UnsupportedMediaError("The uploaded audio decodes to no samples.", param="file",
                                    code="unsupported_media")
    return samples, int(sample_rate)


def to_wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono PCM16 WAV with exact sizes (what the voice stage receives for enrollment)."""
    return wav_header(int(np.asarray(samples).size), sample_rate) + to_pcm16(samples)
