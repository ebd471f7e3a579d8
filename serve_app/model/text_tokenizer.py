"""A Hugging Face `tokenizers` BPE vocabulary in the shape of upstream's tokenizer.json, for random checkpoints.

Upstream: [STOP]=0 (stop_text_token), [UNK]=1, [SPACE]=2, [START]=255 (start_text_token); 704 ids for English,
2454 for the multilingual model, whose text is prefixed with a language tag such as "[fr]".
"""
from __future__ import annotations

import string

from tokenizers import Tokenizer, models, pre_tokenizers

SPECIAL = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[PAD]": 3, "[SEP]": 4, "[CLS]": 5, "[MASK]": 6, "[START]": 255}
LANGUAGES = ("ar da de el en es fi fr he hi it ja ko ms nl no pl pt ru sv sw tr zh").split()


def build_bpe_tokenizer(vocab_size: int, multilingual: bool = False) -> Tokenizer:
    """Characters, then pairwise merges of lowercase letters, up to `vocab_size` ids."""
    vocab: dict[str, int] = dict(SPECIAL)
    specials = list(SPECIAL)
    if multilingual:
        specials += [f"[{lang}]" for lang in LANGUAGES]
    free = (i for i in range(vocab_size) if i not in vocab.values())
    for tok in specials[len(SPECIAL):]:
        vocab[tok] = next(free)
    chars = string.ascii_letters + string.digits + string.punctuation + "àâçéèêëîïôûùüÿñæœäöüßáíóú"
    for ch in dict.fromkeys(chars):
        if ch not in vocab:
            vocab[ch] = next(free)
    merges: list[tuple[str, str]] = []
    letters = string.ascii_lowercase
    for a in letters:
        for b in letters:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = next(free)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return tok
