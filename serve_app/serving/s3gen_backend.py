"""S3Gen backends: speech tokens -> 24 kHz audio inside an S3Gen stage replica.

One contract (`S3GenBackend.vocode_batch`, synchronous, run on the stage's worker thread), two implementations:

- `UpstreamS3GenBackend`: upstream `S3Gen.inference` per item (batch-1 upstream code). Streaming calls
  re-synthesise the whole token prefix less the 3 look-ahead tokens and hand out only the samples past `StreamState.num_samples_emitted`: simple and correct in length,
  O(T^2) in work, which is why it is the fallback.
- `EngineS3GenBackend`: our batched `S3GenEngine` (`vocode` for one-shot jobs in one batch,
  `vocode_stream_step` for streams, which carries HiFT's source cache in the StreamState).
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import torch

from .contracts import StreamState, VocodeJob, VocodeResult, VoiceConds

log = logging.getLogger(__name__)


class S3GenBackend(Protocol):
    name: str

    def prepare_conds(self, conds: VoiceConds) -> Any:
        """VoiceConds (numpy) -> this backend's conditioning on its device (cached by the stage)."""

    def vocode_batch(self, jobs: list[VocodeJob], conds: list[Any]) -> list[VocodeResult]:
        """One result per job, in order. Runs on a worker thread."""


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

    def _stream(self, job: VocodeJob, ref: dict) -> VocodeResult:
        state = job.stream_state or StreamState()
        tokens = job.speech_tokens
        lookahead = 0 if job.finalize else int(getattr(self.s3gen.flow, "pre_lookahead_len", 3))
        if len(tokens) - lookahead <= 0:
            return VocodeResult(job.request_id, np.zeros(0, np.float32), state)
        # Upstream's finalize=False path mis-sizes its mask when a prompt is present, so the prefix without the
        # look-ahead tokens is synthesised as if final: same length, slightly different last frames.
        speech = torch.tensor(tokens[: len(tokens) - lookahead], dtype=torch.long, device=self.device)[None]  # [1, T']
        with torch.inference_mode():
            mels = self.s3gen.flow_inference(speech, ref_dict=dict(ref), finalize=True)           # [1, 80, 2T']
            wav, _ = self.s3gen.hift_inference(mels.to(self.dtype), None)                        # [1, 960 T']
            wav[:, : len(self.s3gen.trim_fade)] *= self.s3gen.trim_fade
        wav = wav.squeeze(0).float().cpu().numpy()
        new = wav[state.num_samples_emitted:]
        new_state = StreamState(num_mel_frames_emitted=int(mels.shape[-1]),
                                num_samples_emitted=state.num_samples_emitted + int(new.size))
        return VocodeResult(job.request_id, new, None if job.finalize else new_state)

    def vocode_batch(self, jobs: list[VocodeJob], conds: list[dict]) -> list[VocodeResult]:
        out = []
        for job, ref in zip(jobs, conds):
            if job.seed is not None:
                torch.manual_seed(job.seed)
            if job.stream_state is None and job.finalize:
                out.append(VocodeResult(job.request_id, self._one_shot(job.speech_tokens, ref)))
            else:
                out.append(self._stream(job, ref))
        return out


class EngineS3GenBackend:
    """`serve_app.engine.s3gen.S3GenEngine`: one batched `step` for the whole batch, one-shot and stream jobs
    alike (the engine carries HiFT's source cache and the crossfade tail in the StreamState)."""

    name = "engine"

    def __init__(self, engine: Any, device: str, dtype: torch.dtype) -> None:
        self.engine = engine
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_model(cls, s3gen: torch.nn.Module, *, device: str, dtype: torch.dtype, quant: Any = None,
                   extra: dict | None = None) -> EngineS3GenBackend:
        from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig

        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        kwargs: dict[str, Any] = {"device": device, "quant": quant, "dtype": names[dtype], **(extra or {})}
        return cls(S3GenEngine(s3gen, S3GenEngineConfig(**kwargs)), device, dtype)

    def prepare_conds(self, conds: VoiceConds) -> Any:
        return self.engine.prepare_conds(conds)

    def vocode_batch(self, jobs: list[VocodeJob], conds: list[Any]) -> list[VocodeResult]:
        from serve_app.engine.s3gen import VocodeInput

        inputs = []
        for job, c in zip(jobs, conds):
            streaming = not (job.finalize and job.stream_state is None)
            inputs.append(VocodeInput(job.speech_tokens, c, job.seed, job.finalize,
                                      (job.stream_state or StreamState()) if streaming else None))
        results = []
        for job, (audio, state) in zip(jobs, self.engine.step(inputs)):
            results.append(VocodeResult(job.request_id, np.asarray(audio, np.float32).reshape(-1),
                                        None if job.finalize else state))
        return results
