"""The Perth watermark upstream puts on every generated clip, applied where a stage hands out final audio.

On by default (as upstream). `watermark: false` (or CHATTERBOX_WATERMARK=0) never imports perth, which
matters where Perth's model files are missing (e.g. the GPU wheel bundle).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


class Watermarker:
    def __init__(self, enabled: bool = True, sample_rate: int = 24_000) -> None:
        self.enabled = enabled
        self.sample_rate = sample_rate
        self._impl = None
        if enabled:
            try:
                import perth

                impl_cls = getattr(perth, "PerthImplicitWatermarker", None)
                if impl_cls is None:
                    raise ImportError("perth.PerthImplicitWatermarker is None (needs setuptools<81 for pkg_resources)")
                self._impl = impl_cls()
            except Exception as e:
                raise RuntimeError(
                    f"the Perth watermarker could not be loaded ({e!r}); install resemble-perth with its model "
                    "files, or turn the watermark off with `watermark: false` in the serve config or "
                    "CHATTERBOX_WATERMARK=0"
                ) from e

    def apply(self, audio: np.ndarray) -> np.ndarray:
        # audio: [N] float32 at sample_rate -> [N] float32
        if self._impl is None or audio.size == 0:
            return audio
        out = self._impl.apply_watermark(audio, sample_rate=self.sample_rate)
        return np.asarray(out, dtype=np.float32).reshape(-1)[: audio.size]
