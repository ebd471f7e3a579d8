"""Batched HiFT vocoder: mel frames -> 24 kHz audio for rows of different lengths.

Same math as upstream `HiFTGenerator.inference` (f0 predictor -> neural source -> decode -> iSTFT), with:
- every conv output masked past the row's length, so a padded row sees the zeros a lone row's conv padding
  would give it (HiFT's convs are not causal; without masks the padding would leak into a row's last frames);
- the source's random phases and noise drawn from per-request generators (upstream uses the global RNG), the
  noise indexed by absolute sample position and the harmonic phase carried across stream chunks, so a stream
  sees the same source as a one-shot decode;
- the source STFT done per row on the valid part (its reflect padding depends on the row's end), the iSTFT
  batched with each row's own window envelope (`istft_rows`: torch.istft waits for the GPU at every call);
- `cache_source` per row (streaming): the first samples of the source are replaced to keep phase continuity;
- Snake activations with 1/(alpha + eps) precomputed (read at construction: build the runner after loading).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import SAMPLES_PER_MEL_FRAME
from .transfer import to_device


@dataclass
class HiftRow:
    mel: torch.Tensor                        # [80, M] mel frames
    seed: int                                # source noise seed
    cache_source: torch.Tensor | None = None  # [S] float32 source samples to reuse at the start (S <= 480 M)
    sample_offset: int = 0                    # where this row starts in the request's audio (streaming)
    phase0: torch.Tensor | None = None        # [H] harmonic phases (cycles) carried from the previous chunk
    phase_at: int | None = None               # report the harmonic phases reached just before this sample


NOISE_BLOCK = 24_000  # source noise is drawn per (seed, block of 1 s) so a sample gets the same noise in any chunk


def fold_weight_norm(module: torch.nn.Module) -> int:
    """Replace weight-norm parametrized convs by plain ones holding their current weights (upstream HiFT
    recomputes every conv's weight from (g, v) at each call: ~80 extra kernels a chunk). Same values.
    Swaps modules rather than calling `remove_parametrizations`, which deletes the property from the
    parametrized class that deep copies share (and so breaks every other copy). -> number of convs folded."""
    from torch.nn.utils import parametrize

    n = 0
    for parent in list(module.modules()):
        for name, m in list(parent.named_children()):
            if not parametrize.is_parametrized(m, "weight") or len(m.parametrizations) != 1:
                continue
            plain_cls = type(m).__bases__[0]                      # parametrize subclasses the original class
            plain = plain_cls.__new__(plain_cls)
            plain.__dict__.update(m.__dict__)
            plain._parameters = dict(m._parameters)
            plain._buffers = dict(m._buffers)
            plain._modules = {k: v for k, v in m._modules.items() if k != "parametrizations"}
            plain.weight = torch.nn.Parameter(m.weight.detach().clone(), requires_grad=False)
            setattr(parent, name, plain)
            n += 1
    return n


def istft_rows(spec: torch.Tensor, frames: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """`torch.istft(spec[i:i+1, :, :frames[i]], n_fft, hop, n_fft, window)` (center=True) for every row in one go,
    without its host sync: torch.istft checks the window envelope on the host, one GPU wait per call (per row,
    HiFT's rows having different lengths). Same math: inverse rFFT of each frame, windowed, overlap-added, divided
    by the overlap-added squared window of the row's own frames, `n_fft // 2` trimmed from the start.
    spec: [B, n_fft // 2 + 1, TT] complex, frames: [B] int64 valid frames per row (on spec's device)
    -> [B, hop * (TT - 1)] float32; row i is valid for its first hop * (frames[i] - 1) samples."""
    B, _, TT = spec.shape
    valid = (torch.arange(TT, device=spec.device)[None, :] < frames[:, None]).float()[:, None, :]   # [B, 1, TT]
    w = window.float()[None, :, None]                                                             # [1, n_fft, 1]
    seg = torch.fft.irfft(spec, n=n_fft, dim=1) * w * valid                                       # [B, n_fft, TT]
    L = n_fft + hop * (TT - 1)
    y = F.fold(seg, output_size=(1, L), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]        # [B, L]
    env = F.fold((w * w) * valid, output_size=(1, L), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]  # [B, L]
    start = n_fft // 2
    return y[:, start:start + hop * (TT - 1)] / env[:, start:start + hop * (TT - 1)].clamp_min(1e-11)


def _masks(lengths: torch.Tensor, T: int) -> torch.Tensor:
    # lengths: [B] -> [B, 1, T] float32
    return (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).float()[:, None, :]


class HiftRunner:
    def __init__(self, hift: torch.nn.Module, dtype: torch.dtype = torch.float32, length_bucket: int = 1):
        self.hift = hift
        self.dtype = dtype
        self.length_bucket = max(1, length_bucket)   # mel frames: rows are padded (and masked) to a multiple
        self._snake: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # Snake -> (a, 1 / (a + eps)), [1, C, 1]
        for m in hift.modules():
            if type(m).__name__ == "Snake":
                a = m.alpha.detach()[None, :, None]
                a = torch.exp(a) if m.alpha_logscale else a
                self._snake[id(m)] = (a, 1.0 / (a + m.no_div_by_zero))
        self._windows: dict[torch.device, torch.Tensor] = {}   # STFT window per device
        self.trunk_fn = self.trunk                  # what runs: `trunk` or a compiled `trunk`
        self.graphs = None                          # ShapeGraphs of `trunk_fn`, set by the engine (None: eager)
        self.n_fft = hift.istft_params["n_fft"]
        self.hop = hift.istft_params["hop_len"]
        self.upsample_rates = [m.stride[0] for m in hift.ups]
        sine = hift.m_source.l_sin_gen
        self.sine_amp, self.noise_std = sine.sine_amp, sine.noise_std
        self.harmonic_num, self.voiced_threshold = sine.harmonic_num, sine.voiced_threshold
        self.sampling_rate = sine.sampling_rate

    # ---- masked building blocks -------------------------------------------------------------------------
    def _act(self, act: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        # upstream Snake, x + 1/(a + eps) sin^2(a x), with 1/(a + eps) computed once: 4 kernels instead of 7
        params = self._snake.get(id(act))
        if params is None:
            return act(x)
        a, inv = params
        return torch.addcmul(x, inv, torch.sin(x * a).square())

    def _resblock(self, block, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # upstream ResBlock.forward with conv outputs masked; x: [B, C, T], m: [B, 1, T]
        for c1, c2, a1, a2 in zip(block.convs1, block.convs2, block.activations1, block.activations2):
            xt = c1(self._act(a1, x)) * m
            xt = c2(self._act(a2, xt)) * m
            x = xt + x
        return x

    def _f0(self, mel: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # mel: [B, 80, M], m: [B, 1, M] -> f0 [B, M] Hz
        x = mel
        for layer in self.hift.f0_predictor.condnet:
            x = layer(x)
            if isinstance(layer, torch.nn.Conv1d):
                x = x * m
        x = x.transpose(1, 2)
        return torch.abs(self.hift.f0_predictor.classifier(x).squeeze(-1))

    @staticmethod
    def _noise(seed: int, offset: int, n: int, H: int, device) -> torch.Tensor:
        # -> [H, n] standard normal, a fixed function of (seed, absolute sample index)
        first, last = offset // NOISE_BLOCK, (offset + n - 1) // NOISE_BLOCK
        blocks = []
        for b in range(first, last + 1):
            g = torch.Generator(device=device).manual_seed((int(seed) * 7919 + b) % (2**63 - 1))
            blocks.append(torch.randn(H, NOISE_BLOCK, generator=g, device=device))
        start = offset - first * NOISE_BLOCK
        return torch.cat(blocks, dim=1)[:, start:start + n]

    def _source(self, f0: torch.Tensor, rows: list[HiftRow], lengths_s: list[int]):
        # f0: [B, M] -> source [B, 1, S] float32 (S = 480 M), phases per row ([H] cycles or None);
        # upstream SineGen + SourceModuleHnNSF
        B = f0.shape[0]
        H = self.harmonic_num + 1
        f0_up = F.interpolate(f0[:, None].float(), scale_factor=float(SAMPLES_PER_MEL_FRAME), mode="nearest")  # [B,1,S]
        S = f0_up.shape[-1]
        harm = torch.arange(1, H + 1, device=f0.device, dtype=torch.float32)[None, :, None]  # [1, H, 1]
        cycles = torch.cumsum(f0_up * harm / self.sampling_rate, dim=-1)                  # [B, H, S]
        phase = torch.zeros(B, H, 1, device=f0.device)
        noise = torch.zeros(B, H, S, device=f0.device)
        reached: list[torch.Tensor | None] = []
        for i, r in enumerate(rows):
            if r.phase0 is not None:
                cycles[i] += r.phase0.to(cycles).reshape(H, 1)
            reached.append(None if r.phase_at is None else cycles[i, :, r.phase_at - 1] % 1)
            g = torch.Generator(device=f0.device).manual_seed(int(r.seed))
            n = lengths_s[i]
            phase[i, 1:, 0] = (torch.rand(H - 1, generator=g, device=f0.device) * 2 - 1) * math.pi
            noise[i, :, :n] = self._noise(r.seed, r.sample_offset, n, H, f0.device)
        theta = 2 * math.pi * (cycles % 1)
        sine = self.sine_amp * torch.sin(theta + phase)
        uv = (f0_up > self.voiced_threshold).float()                                        # [B, 1, S]
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        sine = sine * uv + noise_amp * noise                                                  # [B, H, S]
        lin = self.hift.m_source.l_linear
        src = self.hift.m_source.l_tanh(lin(sine.transpose(1, 2).to(lin.weight.dtype))).float()  # [B, S, 1]
        src = src.transpose(1, 2)                                                             # [B, 1, S]
        for i, r in enumerate(rows):
            if r.cache_source is not None and r.cache_source.numel() > 0:
                c = r.cache_source.reshape(-1)
                src[i, 0, :c.shape[0]] = c.to(src.dtype)
        return src, reached

    def _stft(self, s: torch.Tensor) -> torch.Tensor:
        # s: [S] -> [n_fft + 2, S / hop + 1] (real; imag)
        spec = torch.stft(s[None], self.n_fft, self.hop, self.n_fft, window=self._window(s), return_complex=True)
        spec = torch.view_as_real(spec)[0]                                                    # [F, TT, 2]
        return torch.cat([spec[..., 0], spec[..., 1]], dim=0)

    def _window(self, like: torch.Tensor) -> torch.Tensor:
        # upstream keeps the window as a plain CPU tensor and copies it to the device at every call: a blocking
        # copy (a stream sync) per STFT / iSTFT. Copied once per device here.
        w = self._windows.get(like.device)
        if w is None:
            w = self._windows[like.device] = self.hift.stft_window.to(device=like.device, dtype=torch.float32)
        return w

    # ---- the convolution trunk (graphable: device work only, fixed shapes) -------------------------------
    def trunk(self, mel: torch.Tensor, lengths: torch.Tensor, s_stft: torch.Tensor) -> torch.Tensor:
        # mel: [B, 80, M] (self.dtype), lengths: [B] int64 frames, s_stft: [B, n_fft + 2, 120 M + 1] (self.dtype)
        # -> [B, n_fft + 2, 120 M + 1] float32 (log-magnitude; phase)
        hift = self.hift
        M = mel.shape[2]
        x = hift.conv_pre(mel) * _masks(lengths, M).to(self.dtype)
        up_len = lengths
        for i in range(hift.num_upsamples):
            x = F.leaky_relu(x, hift.lrelu_slope)
            x = hift.ups[i](x)
            up_len = up_len * self.upsample_rates[i]
            if i == hift.num_upsamples - 1:
                x = hift.reflection_pad(x)
                up_len = up_len + 1
            m = _masks(up_len, x.shape[-1]).to(self.dtype)
            x = x * m
            si = hift.source_downs[i](s_stft) * m
            si = self._resblock(hift.source_resblocks[i], si, m)
            x = x + si
            xs = None
            for j in range(hift.num_kernels):
                y = self._resblock(hift.resblocks[i * hift.num_kernels + j], x, m)
                xs = y if xs is None else xs + y
            x = xs / hift.num_kernels
        x = F.leaky_relu(x)
        return hift.conv_post(x).float()

    # ---- public -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, rows: list[HiftRow]):
        # -> per row: wav [480 M_i] float32, source [480 M_i] float32, phases [H] cycles at phase_at (or None)
        hift = self.hift
        device = rows[0].mel.device
        B = len(rows)
        lens = [int(r.mel.shape[1]) for r in rows]                                             # host ints
        M = -(-max(lens) // self.length_bucket) * self.length_bucket                          # padded: masked
        lengths = to_device(lens, device, torch.long)                                          # [B], no sync
        mel = torch.zeros(B, 80, M, device=device, dtype=self.dtype)                          # [B, 80, M]
        for i, r in enumerate(rows):
            mel[i, :, :r.mel.shape[1]] = r.mel.to(self.dtype)
        m0 = _masks(lengths, M).to(self.dtype)
        f0 = self._f0(mel, m0).float()                                                        # [B, M]
        lengths_s = [n * SAMPLES_PER_MEL_FRAME for n in lens]
        src, phases = self._source(f0, rows, lengths_s)                                       # [B, 1, S]

        frames = [n // self.hop + 1 for n in lengths_s]                                       # stft frames per row
        TT = int(M * SAMPLES_PER_MEL_FRAME // self.hop + 1)
        s_stft = torch.zeros(B, self.n_fft + 2, TT, device=device, dtype=torch.float32)
        for i in range(B):
            s_stft[i, :, :frames[i]] = self._stft(src[i, 0, :lengths_s[i]])
        s_stft = s_stft.to(self.dtype)
        inputs = dict(mel=mel, lengths=lengths, s_stft=s_stft)
        x = self.trunk_fn(**inputs) if self.graphs is None else self.graphs(inputs)             # [B, n_fft + 2, TT]
        half = self.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :half]), max=1e2)
        phase = torch.sin(x[:, half:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))    # [B, F, TT]
        frames_d = lengths * (SAMPLES_PER_MEL_FRAME // self.hop) + 1                           # [B] = frames
        wav = istft_rows(spec, frames_d, self.n_fft, self.hop, self._window(x))               # [B, hop (TT-1)]
        wav = torch.clamp(wav, -hift.audio_limit, hift.audio_limit)
        wavs = [wav[i, :self.hop * (frames[i] - 1)] for i in range(B)]
        sources = [src[i, 0, :lengths_s[i]] for i in range(B)]
        return wavs, sources, phases
