"""The quantizable components of a Chatterbox replica and where each lives in the upstream modules.

A component is a (root model, submodule path, skip patterns) triple: "t3" is `T3.tfmr` (the Llama backbone),
"t3_extra" is the rest of T3 (embeddings, heads, conditioning encoder), and so on. `quantize_model` runs
`apply_quant` once per component so every component is logged and can carry its own QuantSpec.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from quant.apply import apply_quant, find_linears
from quant.spec import QuantSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Component:
    key: str
    root: str                    # "t3" | "s3gen" | "voice_encoder"
    path: str                    # submodule path inside the root ("" = the root itself)
    skip: tuple[str, ...] = ()   # names (relative to path) owned by another component
    bnb_applies: bool = True     # whether swapping Linear layers is worthwhile (Linear-dominated, runs per request)
    note: str = ""


COMPONENTS: dict[str, Component] = {c.key: c for c in [
    Component("t3", "t3", "tfmr", note="Llama backbone, 30 layers x 7 Linear"),
    Component("t3_extra", "t3", "", skip=("tfmr",), note="embeddings, speech/text heads, conditioning encoder"),
    Component("s3gen_flow_encoder", "s3gen", "flow", skip=("decoder",),
              note="token embedding + upsample conformer encoder + projections"),
    Component("s3gen_flow_decoder", "s3gen", "flow.decoder", note="CFM estimator (U-Net of transformer blocks)"),
    Component("hift", "s3gen", "mel2wav", bnb_applies=False, note="HiFT vocoder: convolutions, bnb does not apply"),
    Component("s3_tokenizer", "s3gen", "tokenizer",
              note="reference-audio tokenizer (Whisper-like), runs once per voice; strategies keep it in float"),
    Component("campplus", "s3gen", "speaker_encoder", bnb_applies=False,
              note="CAMPPlus x-vector: convolutions, runs once per voice, bnb does not apply"),
    Component("voice_encoder", "voice_encoder", "", bnb_applies=False,
              note="mostly an LSTM (one small Linear); bnb Linear quantization does not apply"),
]}
COMPONENT_KEYS: tuple[str, ...] = tuple(COMPONENTS)
T3_KEYS = ("t3", "t3_extra")
S3GEN_KEYS = ("s3gen_flow_encoder", "s3gen_flow_decoder", "hift", "s3_tokenizer", "campplus")


def component_module(comp: Component, roots: dict[str, nn.Module]) -> nn.Module | None:
    root = roots.get(comp.root)
    if root is None:
        return None
    return root.get_submodule(comp.path) if comp.path else root


def count_params(module: nn.Module, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(all parameters, parameters inside Linear weights+biases) of `module`, excluding skipped subtrees."""
    from quant.apply import is_skipped

    total = linear = 0
    for name, m in module.named_modules():
        if is_skipped(name, skip):
            continue
        n = sum(p.numel() for p in m.parameters(recurse=False))
        total += n
        if isinstance(m, nn.Linear):
            linear += n
    return total, linear


def linear_shapes(module: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[int, int, bool]]:
    """(out_features, in_features, has_bias) of every float Linear a pass would replace."""
    out = []
    for name in find_linears(module, skip):
        lin = module.get_submodule(name)
        out.append((lin.out_features, lin.in_features, lin.bias is not None))
    return out


def quantize_model(specs: dict[str, QuantSpec], *, t3: nn.Module | None = None, s3gen: nn.Module | None = None,
                   voice_encoder: nn.Module | None = None, device: str | torch.device | None = None) -> dict[str, list[str]]:
    """Apply each component's spec to the models given; returns {component: replaced Linear names}.

    Components whose model is not given are ignored, so a T3-only replica passes only `t3`.
    """
    roots = {"t3": t3, "s3gen": s3gen, "voice_encoder": voice_encoder}
    unknown = set(specs) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; known: {list(COMPONENT_KEYS)}")
    done: dict[str, list[str]] = {}
    for key, spec in specs.items():
        comp = COMPONENTS[key]
        module = component_module(comp, roots)
        if module is None:
            continue
        if spec.is_bnb and not comp.bnb_applies:
            logger.warning("%s: %s", key, comp.note)
        merged = QuantSpec(spec.method, spec.dtype, spec.int8_threshold, spec.double_quant, spec.skip + comp.skip)
        done[key] = apply_quant(module, merged, device=device, name=key)
    return done
