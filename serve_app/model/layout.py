"""File names of the upstream checkpoint layouts (ResembleAI/chatterbox on the Hugging Face hub)."""
from __future__ import annotations

from dataclasses import dataclass

HUB_REPO_ID = "ResembleAI/chatterbox"
# The revision every hub download asks for: a commit of ResembleAI/chatterbox that holds both the English files
# and the multilingual v2 files chatterbox-tts 0.1.7 loads (t3_mtl23ls_v2, grapheme_mtl_merged_expanded_v1).
# Override with CHATTERBOX_HUB_REVISION (e.g. "main" for the newest).
HUB_REVISION = "5bb1f6ee58e50c3b8d408bc82a6d3740c2db6e18"
# Written beside a random-weight checkpoint; its presence is how the loader knows to announce random weights.
RANDOM_MARKER = "chatterbox_serve_random.json"


@dataclass(frozen=True)
class Layout:
    ve: str
    t3: str
    s3gen: str
    tokenizer: str
    conds: str = "conds.pt"
    extra: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return (self.ve, self.t3, self.s3gen, self.tokenizer, self.conds, *self.extra)


ENGLISH = Layout(ve="ve.safetensors", t3="t3_cfg.safetensors", s3gen="s3gen.safetensors", tokenizer="tokenizer.json")
MULTILINGUAL = Layout(
    ve="ve.pt",
    t3="t3_mtl23ls_v2.safetensors",
    s3gen="s3gen.pt",
    tokenizer="grapheme_mtl_merged_expanded_v1.json",
    extra=("Cangjie5_TC.json",),
)


def layout_for(multilingual: bool) -> Layout:
    return MULTILINGUAL if multilingual else ENGLISH
