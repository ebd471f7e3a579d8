"""Model presets: the real Chatterbox architecture (`full`) and a small one (`tiny`) for fast tests.

Both presets build the *upstream* chatterbox module classes (T3, S3Gen, VoiceEncoder), so every code path
that runs on `tiny` is the one that runs on `full`; only dimensions differ. A preset is inferred back from a
checkpoint's tensor shapes (`preset_from_t3_state`), so a real hub checkpoint needs no extra metadata.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from chatterbox.models.s3gen import S3Gen
from chatterbox.models.t3 import T3
from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
from chatterbox.models.t3.modules.t3_config import T3Config
from chatterbox.models.voice_encoder import VoiceEncoder

ENGLISH_TEXT_VOCAB = 704
MULTILINGUAL_TEXT_VOCAB = 2454


@dataclass(frozen=True)
class T3Dims:
    num_layers: int = 30
    intermediate_size: int = 4096
    # hidden_size is fixed at 1024 by upstream's Perceiver (pre_attention_query_size=1024).
    hidden_size: int = 1024
    num_heads: int = 16


@dataclass(frozen=True)
class S3GenDims:
    encoder_blocks: int = 6          # UpsampleConformerEncoder num_blocks
    decoder_blocks: int = 4          # ConditionalDecoder n_blocks
    decoder_mid_blocks: int = 12     # ConditionalDecoder num_mid_blocks
    tokenizer_layers: int = 6        # S3TokenizerV2 n_audio_layer


@dataclass(frozen=True)
class ModelPreset:
    name: str
    t3: T3Dims = field(default_factory=T3Dims)
    s3gen: S3GenDims = field(default_factory=S3GenDims)

    @property
    def llama_config_name(self) -> str:
        return "Llama_520M" if self.name == "full" else f"Llama_{self.name}"


PRESETS: dict[str, ModelPreset] = {
    "full": ModelPreset("full"),
    "tiny": ModelPreset(
        "tiny",
        t3=T3Dims(num_layers=2, intermediate_size=1024),
        s3gen=S3GenDims(encoder_blocks=1, decoder_blocks=1, decoder_mid_blocks=1, tokenizer_layers=1),
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _register_llama_config(preset: ModelPreset) -> str:
    """Upstream T3 looks its backbone up by name in LLAMA_CONFIGS; add the preset's entry once."""
    name = preset.llama_config_name
    if name not in LLAMA_CONFIGS:
        cfg = copy.deepcopy(LLAMA_CONFIGS["Llama_520M"])
        cfg.update(
            num_hidden_layers=preset.t3.num_layers,
            intermediate_size=preset.t3.intermediate_size,
            hidden_size=preset.t3.hidden_size,
            num_attention_heads=preset.t3.num_heads,
            num_key_value_heads=preset.t3.num_heads,
        )
        LLAMA_CONFIGS[name] = cfg
    return name


def t3_config(preset: ModelPreset, multilingual: bool = False) -> T3Config:
    hp = T3Config.multilingual() if multilingual else T3Config.english_only()
    hp.llama_config_name = _register_llama_config(preset)
    return hp


def build_t3(preset: ModelPreset, multilingual: bool = False) -> T3:
    return T3(t3_config(preset, multilingual))


def build_s3gen(preset: ModelPreset) -> S3Gen:
    """Upstream S3Gen (S3Token2Wav); for smaller presets the same classes are rebuilt with fewer blocks."""
    s3gen = S3Gen()
    if preset.s3gen == S3GenDims():
        return s3gen
    from chatterbox.models.s3gen.decoder import ConditionalDecoder
    from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec
    from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM
    from chatterbox.models.s3gen.configs import CFM_PARAMS
    from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder
    from chatterbox.models.s3tokenizer import S3Tokenizer
    from s3tokenizer.model_v2 import ModelConfig

    d = preset.s3gen
    encoder = UpsampleConformerEncoder(
        output_size=512, attention_heads=8, linear_units=2048, num_blocks=d.encoder_blocks, dropout_rate=0.1,
        positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True, input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn", input_size=512,
        use_cnn_module=False, macaron_style=False,
    )
    estimator = ConditionalDecoder(
        in_channels=320, out_channels=80, causal=True, channels=[256], dropout=0.0, attention_head_dim=64,
        n_blocks=d.decoder_blocks, num_mid_blocks=d.decoder_mid_blocks, num_heads=8, act_fn="gelu",
        meanflow=s3gen.meanflow,
    )
    decoder = CausalConditionalCFM(spk_emb_dim=80, cfm_params=CFM_PARAMS, estimator=estimator)
    s3gen.flow = CausalMaskedDiffWithXvec(encoder=encoder, decoder=decoder)
    cfg = ModelConfig()
    cfg.n_audio_layer = d.tokenizer_layers

    class _SmallTokenizer(S3Tokenizer):
        def __init__(self):
            # S3Tokenizer passes no config to S3TokenizerV2; give it the smaller one.
            super(S3Tokenizer, self).__init__("speech_tokenizer_v2_25hz", cfg)
            import librosa

            self.n_fft = 400
            self.register_buffer("_mel_filters", torch.FloatTensor(librosa.filters.mel(sr=16000, n_fft=400, n_mels=cfg.n_mels)))
            self.register_buffer("window", torch.hann_window(self.n_fft))

    s3gen.tokenizer = _SmallTokenizer()
    return s3gen


def build_voice_encoder() -> VoiceEncoder:
    return VoiceEncoder()


def preset_from_t3_state(state: dict[str, torch.Tensor]) -> tuple[ModelPreset, bool]:
    """Infer (preset, multilingual) from a T3 state dict's keys and shapes."""
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("tfmr.layers."))
    inter = state["tfmr.layers.0.mlp.gate_proj.weight"].shape[0]
    multilingual = state["text_emb.weight"].shape[0] == MULTILINGUAL_TEXT_VOCAB
    for p in PRESETS.values():
        if p.t3.num_layers == layers and p.t3.intermediate_size == inter:
            return p, multilingual
    raise ValueError(f"T3 checkpoint with {layers} layers and intermediate size {inter} matches no preset")


def preset_from_s3gen_state(state: dict[str, torch.Tensor]) -> S3GenDims:
    def count(prefix: str, pos: int) -> int:
        idx = {int(k[len(prefix):].split(".")[pos]) for k in state if k.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    return S3GenDims(
        encoder_blocks=count("flow.encoder.encoders.", 0),
        decoder_blocks=count("flow.decoder.estimator.down_blocks.0.1.", 0),
        decoder_mid_blocks=count("flow.decoder.estimator.mid_blocks.", 0),
        tokenizer_layers=count("tokenizer.encoder.blocks.", 0),
    )
