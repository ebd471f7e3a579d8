"""QuantSpec: how one component is stored and computed (a frozen dataclass, validated once)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["none", "int8", "nf4", "fp4", "dynamic_int8"]
DType = Literal["fp32", "fp16", "bf16"]

METHODS: tuple[str, ...] = ("none", "int8", "nf4", "fp4", "dynamic_int8")
BNB_METHODS: tuple[str, ...] = ("int8", "nf4", "fp4")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class QuantSpec:
    method: Method = "none"
    dtype: DType = "bf16"           # dtype of everything not quantized, and the bnb compute dtype
    int8_threshold: float = 6.0     # bnb Linear8bitLt outlier threshold; 0.0 is CUDA-graph capturable
    double_quant: bool = True       # nf4/fp4: quantize the absmax statistics too
    skip: tuple[str, ...] = ()      # fnmatch patterns of module names left unquantized

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {list(METHODS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {list(DTYPES)}")
        if self.int8_threshold < 0:
            raise ValueError(f"int8_threshold={self.int8_threshold} is negative; use 0.0 (no outliers) or e.g. 6.0")
        if self.method == "dynamic_int8" and self.dtype != "fp32":
            raise ValueError(
                f"dynamic_int8 computes in fp32 (torch dynamic quantization), got dtype={self.dtype!r}; set dtype='fp32'"
            )
        if isinstance(self.skip, (str, list)):
            object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_bnb(self) -> bool:
        return self.method in BNB_METHODS

    def label(self) -> str:
        """Short human label: 'nf4/bf16', 'int8@0.0/bf16', 'none/fp32'."""
        m = f"int8@{self.int8_threshold:g}" if self.method == "int8" else self.method
        if self.method in ("nf4", "fp4") and not self.double_quant:
            m += "-nodq"
        return f"{m}/{self.dtype}"


def parse_spec(text: str, base: QuantSpec | None = None) -> QuantSpec:
    """'int8', 'nf4:fp16', 'none:fp32', 'int8@0:bf16' -> QuantSpec (fields not given come from `base`)."""
    base = base or QuantSpec()
    method, _, dtype = text.strip().partition(":")
    method, _, thr = method.partition("@")
    kw: dict = {"method": method or base.method, "dtype": dtype or base.dtype}
    if thr:
        try:
            kw["int8_threshold"] = float(thr)
        except ValueError:
            raise ValueError(f"bad int8 threshold in {text!r}; write e.g. 'int8@0' or 'int8@6.0'") from None
    if kw["method"] == "dynamic_int8" and not dtype:
        kw["dtype"] = "fp32"
    return QuantSpec(
        method=kw["method"], dtype=kw["dtype"], int8_threshold=kw.get("int8_threshold", base.int8_threshold),
        double_quant=base.double_quant, skip=base.skip,
    )
