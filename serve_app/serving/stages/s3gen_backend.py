"""S3Gen backends: speech tokens -> 24 kHz audio inside an S3Gen stage replica.

One contract (`S3GenBackend.vocode_batch`, synchronous, run on the stage's worker thread), two implementations:

- `UpstreamS3GenBackend`: upstream `S3Gen.inference` per item (batch-1 upstream code). Streaming steps
  re-synthesise the whole token prefix less the 3 look-ahead tokens and hand out only the samples past those
  already emitted: simple and correct in length, O(T^2) in work, which is why it is the fallback.
- `EngineS3GenBackend`: our batched `S3GenEngine`: one `step` for one-shot items and stream steps together; a
  stream step runs the flow on the new tokens plus a bounded left context (the engine's stream state, kept on
  the device in this replica for the stream's life).

A `VocodeItem` is one stream's (or one-shot job's) part of a step: the tokens so far, `finalize` on its last
step, and the backend's stream state (`new_stream_state()` at the first step; None for a one-shot decode).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from serve_app.contracts import VoiceConds

log = logging.getLogger(__name__)


@dataclass
class VocodeItem:
    tokens: list[int]          # the stream's speech tokens so far (< 6561)
    conds: Any                 # the backend's prepared conditioning (prepare_conds)
    seed: int | None
    finalize: bool = True      # the stream's last step (one-shot: always)
    state: Any = None          # None: one-shot decode; else the backend's stream state
    request_id: str = ""       # for logs


class S3GenBackend(Protocol):
    name: str

    def prepare_conds(self, conds: VoiceConds) -> Any:
        """VoiceConds (numpy) -> this backend's conditioning on its device (cached by the stage)."""

    def new_stream_state(self) -> Any:
        """The state of a stream before its first step."""

    def vocode_batch(self, items: list[VocodeItem]) -> list[tuple[np.ndarray, Any]]:
        """Per item, in order: (the new audio, float32 [N] at 24 kHz; the stream's next state). Worker thread."""


def gen_ref_dict(vc: VoiceConds, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Upstream `Conditionals.gen` (S3Gen's ref_dict) from VoiceConds, on device."""
    return dict(
        prompt_token=torch.from_numpy(vc.gen_prompt_token).to(device).long(),
        prompt_token_len=torch.from_numpy(vc.gen_prompt_token_len).to(device).long(),
        prompt_feat=torch.from_numpy(vc.gen_prompt_feat).to(device=device, dtype=dtype),
        prompt_feat_len=None,
        embedding=torch.from_numpy(vc.gen_embedding).to(device=device, dtype=dtype),
    )


def _s3gen_device(s3gen: torch.nn.Module) -> torch.device:
    return next(s3gen.flow.parameters()).device


class UpstreamS3GenBackend:
    name = "upstream"

    def __init__(self, s3gen: torch.nn.Module) -> None:
        self.s3gen = s3gen
        self.device = str(_s3gen_device(s3gen))
        self.dtype = next(s3gen.flow.parameters()).dtype

    def prepare_conds(self, conds: VoiceConds) -> dict:
        return gen_ref_dict(conds, self.device, self.dtype)

    def _one_shot(self, tokens: list[int], ref: dict) -> np.ndarray:
        # tokens: [T] ints < 6561 -> audio [T * 960] float32
        if not tokens:
            return np.zeros(0, np.float32)
        speech = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(0)   # [1, T]
        wav, _ = self.s3gen.inference(speech_tokens=speech, ref_dict=dict(ref))
        return wav.squeeze(0).float().cpu().numpy()

    def new_stream_state(self) -> dict:
        return {"num_samples": 0}

    def _stream(self, item: VocodeItem, ref: dict) -> tuple[np.ndarray, dict]:
        state, tokens = item.state, item.tokens
        lookahead = 0 if item.finalize else int(getattr(self.s3gen.flow, "pre_lookahead_len", 3))
        if len(tokens) - lookahead <= 0:
            return np.zeros(0, np.float32), state
        # Upstream's finalize=False path mis-sizes its mask when a prompt is present, so the prefix without the
        # look-ahead tokens is synthesised as if final: same length, slightly different last frames.
        speech = torch.tensor(tokens[: len(tokens) - lookahead], dtype=torch.long, device=self.device)[None]  # [1, T']
        with torch.inference_mode():
            mels = self.s3gen.flow_inference(speech, ref_dict=dict(ref), finalize=True)           # [1, 80, 2T']
            wav, _ = self.s3gen.hift_inference(mels.to(self.dtype), None)                        # [1, 960 T']
            wav[:, : len(self.s3gen.trim_fade)] *= self.s3gen.trim_fade
        wav = wav.squeeze(0).float().cpu().numpy()
        new = wav[state["num_samples"]:]
        return new, {"num_samples": state["num_samples"] + int(new.size)}

    def vocode_batch(self, items: list[VocodeItem]) -> list[tuple[np.ndarray, Any]]:
        out = []
        for item in items:
            if item.seed is not None:
                torch.manual_seed(item.seed)
            if item.state is None:
                out.append((self._one_shot(item.tokens, item.conds), None))
            else:
                out.append(self._stream(item, item.conds))
        return out


class EngineS3GenBackend:
    """`serve_app.engine.s3gen.S3GenEngine`: one batched `step` for the whole batch, one-shot and stream items
    alike."""

    name = "engine"

    def __init__(self, engine: Any, device: str, dtype: torch.dtype) -> None:
        self.engine = engine
        self.device = device
        self.dtype = dtype
        self._captures_at_start = 0

    @classmethod
    def from_model(cls, s3gen: torch.nn.Module, *, device: str, dtype: torch.dtype, quant: Any = None,
                   extra: dict | None = None) -> EngineS3GenBackend:
        from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig

        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        kwargs: dict[str, Any] = {"device": device, "quant": quant, "dtype": names[dtype], **(extra or {})}
        return cls(S3GenEngine(s3gen, S3GenEngineConfig(**kwargs)), device, dtype)

    def prepare_conds(self, conds: VoiceConds) -> Any:
        return self.engine.prepare_conds(conds)

    def new_stream_state(self) -> Any:
        from serve_app.engine.s3gen import StreamState

        return StreamState()

    def vocode_batch(self, items: list[VocodeItem]) -> list[tuple[np.ndarray, Any]]:
        from serve_app.engine.s3gen import VocodeInput

        inputs = [VocodeInput(it.tokens, it.conds, it.seed, it.finalize, it.state) for it in items]
        return [(np.asarray(audio, np.float32).reshape(-1), state) for audio, state in self.engine.step(inputs)]

    def vocode_batch_groups(self, items: list[VocodeItem]) -> Iterator[list[tuple[int, tuple[np.ndarray, Any]]]]:
        """`vocode_batch`'s results one flow call at a time (`S3GenEngine.step_groups`): [(item index, (audio,
        state))] per call, the call with the earliest item first. Worker thread."""
        from serve_app.engine.s3gen import VocodeInput

        inputs = [VocodeInput(it.tokens, it.conds, it.seed, it.finalize, it.state) for it in items]
        for group in self.engine.step_groups(inputs):
            yield [(i, (np.asarray(audio, np.float32).reshape(-1), state)) for i, (audio, state) in group]

    def stats(self) -> dict[str, int]:
        """The engine's running totals (tokens through the flow, padded row-tokens, flow calls, graph captures since
        warm-up)."""
        s = self.engine.stats
        return {"num_flow_tokens": s.num_flow_tokens, "num_flow_row_tokens": s.num_flow_row_tokens,
                "num_flow_padded_tokens": s.num_flow_padded_tokens, "num_flow_calls": s.num_flow_calls,
                "num_graph_captures": self.engine.num_graph_captures() - self._captures_at_start}

    def mark_warm(self) -> None:
        """Graph captures from here on count as captured while serving."""
        self._captures_at_start = self.engine.num_graph_captures()
