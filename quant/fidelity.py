"""Fidelity of a quantized component against its float reference, on the same inputs.

    T3:    teacher-forced logits: the backbone on fixed random input embeddings, then speech_head
           -> relative L2 error, KL(p_ref || p_quant) per position, top-1 and top-k agreement
    S3Gen: upstream `flow.inference` with the same seed (the CFM noise) on random tokens and a random conds dict
           -> mel relative L2 and log-spectral distance (dB)
    waveform (optional): relative L2 and multi-resolution STFT log-spectral distance
    hooks (optional, not run by default): WER through an ASR callable, speaker similarity through an embedder

The reference is bf16 on CUDA and fp32 on CPU (`reference_dtype`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant.apply import apply_quant
from quant.spec import QuantSpec

DB_PER_NEPER = 20.0 / math.log(10.0)  # log-mel (natural log of amplitude) -> dB


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the first floating parameter (quantized layers hold int8/uint8 weights)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def reference_dtype(device: str | torch.device) -> str:
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


# ---- metrics --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitFidelity:
    rel_err: float       # ||q - r|| / ||r|| over all logits
    kl: float            # mean over positions of KL(softmax(r) || softmax(q)), nats
    top1: float          # fraction of positions where argmax agrees
    topk: float          # mean overlap of the top-k sets
    k: int

    def row(self) -> dict:
        return asdict(self)


def logit_metrics(ref: torch.Tensor, q: torch.Tensor, k: int = 10) -> LogitFidelity:
    # ref, q: [..., V] -> scalars over all positions
    r, qq = ref.float().flatten(0, -2), q.float().flatten(0, -2)  # [N, V]
    rel = ((qq - r).norm() / r.norm().clamp_min(1e-12)).item()
    kl = F.kl_div(F.log_softmax(qq, -1), F.log_softmax(r, -1), log_target=True, reduction="none").sum(-1).mean().item()
    top1 = (r.argmax(-1) == qq.argmax(-1)).float().mean().item()
    tr, tq = r.topk(k, -1).indices, qq.topk(k, -1).indices  # [N, k]
    overlap = (tr.unsqueeze(-1) == tq.unsqueeze(-2)).any(-1).float().mean().item()
    return LogitFidelity(rel, kl, top1, overlap, k)


@dataclass(frozen=True)
class MelFidelity:
    rel_l2: float        # ||q - r|| / ||r|| on the log-mel
    lsd_db: float        # mean over frames of the RMS difference over mel bins, in dB

    def row(self) -> dict:
        return asdict(self)


def mel_metrics(ref: torch.Tensor, q: torch.Tensor) -> MelFidelity:
    # ref, q: [B, 80, T] log-mel (natural log of amplitude) -> scalars
    r, qq = ref.float(), q.float()
    rel = ((qq - r).norm() / r.norm().clamp_min(1e-12)).item()
    lsd = ((qq - r) * DB_PER_NEPER).pow(2).mean(1).sqrt().mean().item()
    return MelFidelity(rel, lsd)


def waveform_metrics(ref: torch.Tensor, q: torch.Tensor, ffts: tuple[int, ...] = (512, 1024, 2048)) -> dict:
    # ref, q: [B, S] or [S] waveforms -> {"rel_l2", "stft_lsd_db"}
    r, qq = ref.float().reshape(-1), q.float().reshape(-1)
    n = min(r.numel(), qq.numel())
    r, qq = r[:n], qq[:n]
    lsds = []
    for nfft in ffts:
        win = torch.hann_window(nfft, device=r.device)
        sr = torch.stft(r, nfft, nfft // 4, window=win, return_complex=True).abs().clamp_min(1e-5)
        sq = torch.stft(qq, nfft, nfft // 4, window=win, return_complex=True).abs().clamp_min(1e-5)
        lsds.append((20 * (sq.log10() - sr.log10())).pow(2).mean(0).sqrt().mean().item())
    return {"rel_l2": ((qq - r).norm() / r.norm().clamp_min(1e-12)).item(), "stft_lsd_db": sum(lsds) / len(lsds)}


# ---- optional perceptual hooks ---------------------------------------------------------------------------------
@dataclass
class FidelityHooks:
    """Plug in models the project does not ship: asr(wav [S] float32, sr) -> text; speaker_embed(wav, sr) -> [D]."""
    asr: Callable[[torch.Tensor, int], str] | None = None
    speaker_embed: Callable[[torch.Tensor, int], torch.Tensor] | None = None


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words / number of reference words."""
    ref, hyp = reference.lower().split(), hypothesis.lower().split()
    d = list(range(len(hyp) + 1))
    for i, rw in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(hyp)] / max(len(ref), 1)


def run_hooks(hooks: FidelityHooks, text: str, ref_wav: torch.Tensor, q_wav: torch.Tensor, sr: int) -> dict:
    out: dict = {}
    if hooks.asr is not None:
        out["wer_ref"] = word_error_rate(text, hooks.asr(ref_wav, sr))
        out["wer_quant"] = word_error_rate(text, hooks.asr(q_wav, sr))
    if hooks.speaker_embed is not None:
        a, b = hooks.speaker_embed(ref_wav, sr).float().reshape(-1), hooks.speaker_embed(q_wav, sr).float().reshape(-1)
        out["speaker_similarity"] = F.cosine_similarity(a, b, dim=0).item()
    return out


# ---- per-component runs ----------------------------------------------------------------------------------------
def quantized_copy(module: nn.Module, spec: QuantSpec, device: str | torch.device, name: str) -> nn.Module:
    m = copy.deepcopy(module).to(device)
    apply_quant(m, spec, device=device, name=name)
    return m.eval()


@torch.inference_mode()
def t3_logits(t3: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    # embeds: [B, T, D] -> logits [B, T, V_speech] fp32 (teacher forced: all positions in one forward)
    dtype = float_dtype(t3.tfmr)
    h = t3.tfmr(inputs_embeds=embeds.to(dtype)).last_hidden_state
    return t3.speech_head(h.to(t3.speech_head.weight.dtype)).float()


def t3_fidelity(t3: nn.Module, spec: QuantSpec, *, device: str = "cpu", batch: int = 2, seq_len: int = 64,
                seed: int = 0, k: int = 10) -> LogitFidelity:
    """Quantize a copy of `t3.tfmr` with `spec`, compare speech logits to the float reference (reference_dtype)."""
    ref_dtype = reference_dtype(device)
    ref = quantized_copy(t3, QuantSpec("none", ref_dtype, skip=("speech_head",)), device, "t3_ref")
    q = copy.deepcopy(ref)
    apply_quant(q.tfmr, spec, device=device, name="t3")
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, seq_len, t3.dim, generator=g).to(device)  # [B, T, D]
    return logit_metrics(t3_logits(ref, embeds), t3_logits(q.eval(), embeds), k)


def random_flow_inputs(num_tokens: int = 40, prompt_tokens: int = 20, seed: int = 0, device: str = "cpu") -> dict:
    """Random speech tokens and a conds dict shaped like upstream's `ref_dict` for `flow.inference`."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        token=torch.randint(0, 6561, (1, num_tokens), generator=g).to(device),            # [1, T]
        token_len=torch.tensor([num_tokens], device=device),
        prompt_token=torch.randint(0, 6561, (1, prompt_tokens), generator=g).to(device),  # [1, Tp]
        prompt_token_len=torch.tensor([prompt_tokens], device=device),
        prompt_feat=(torch.randn(1, 2 * prompt_tokens, 80, generator=g) - 5).to(device),   # [1, 2Tp, 80] log-mel
        prompt_feat_len=torch.tensor([2 * prompt_tokens], device=device),
        embedding=torch.randn(1, 192, generator=g).to(device),                           # [1, 192] x-vector
    )


@torch.inference_mode()
def flow_mel(flow: nn.Module, inputs: dict, seed: int = 0, n_timesteps: int = 10) -> torch.Tensor:
    # -> mel [1, 80, 2T] fp32; the seed fixes the CFM noise so reference and quantized see the same draw
    torch.manual_seed(seed)
    dtype = float_dtype(flow.decoder)
    args = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    mel, _ = flow.inference(**args, finalize=True, n_timesteps=n_timesteps)
    return mel.float()


def flow_fidelity(flow: nn.Module, specs: dict[str, QuantSpec], *, device: str = "cpu", num_tokens: int = 40,
                  prompt_tokens: int = 20, seed: int = 0, n_timesteps: int = 10) -> MelFidelity:
    """specs: {"s3gen_flow_encoder": ..., "s3gen_flow_decoder": ...} (missing ones stay float, fp32)."""
    ref = copy.deepcopy(flow).to(device).float().eval()
    q = copy.deepcopy(ref)
    enc = specs.get("s3gen_flow_encoder")
    dec = specs.get("s3gen_flow_decoder")
    if enc is not None:
        apply_quant(q, QuantSpec(enc.method, enc.dtype, enc.int8_threshold, enc.double_quant, enc.skip + ("decoder",)),
                    device=device, name="s3gen_flow_encoder")
    if dec is not None:
        apply_quant(q.decoder, dec, device=device, name="s3gen_flow_decoder")
    inputs = random_flow_inputs(num_tokens, prompt_tokens, seed, device)
    return mel_metrics(flow_mel(ref, inputs, seed, n_timesteps), flow_mel(q.eval(), inputs, seed, n_timesteps))


def evaluate_specs(specs: dict[str, QuantSpec], *, t3: nn.Module | None = None, s3gen: nn.Module | None = None,
                   device: str = "cpu", seed: int = 0, seq_len: int = 64, num_tokens: int = 40,
                   n_timesteps: int = 10) -> dict[str, dict]:
    """Fidelity rows per component for one strategy's specs: {"t3": {...}, "s3gen_flow": {...}}."""
    out: dict[str, dict] = {}
    if t3 is not None and "t3" in specs:
        out["t3"] = {"spec": specs["t3"].label(), **t3_fidelity(t3, specs["t3"], device=device, seed=seed,
                                                                 seq_len=seq_len).row()}
    flow_specs = {k: v for k, v in specs.items() if k in ("s3gen_flow_encoder", "s3gen_flow_decoder")}
    if s3gen is not None and flow_specs:
        label = "+".join(f"{v.label()}" for v in flow_specs.values())
        out["s3gen_flow"] = {"spec": label, **flow_fidelity(s3gen.flow, flow_specs, device=device, seed=seed,
                                                            num_tokens=num_tokens, prompt_tokens=num_tokens // 2,
                                                            n_timesteps=n_timesteps).row()}
    return out
