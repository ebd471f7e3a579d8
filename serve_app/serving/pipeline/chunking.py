"""Text preparation for T3: upstream's punctuation normalisation and sentence-aware chunking.

T3 speaks one text chunk per request (up to `max_new_tokens` speech tokens, 40 s); long inputs are split at
sentence ends into chunks of at most `max_chunk_chars`, each normalised with `punc_norm` exactly as upstream
`ChatterboxTTS.generate` normalises its whole input. An input that fits in one chunk becomes exactly
`[punc_norm(text)]`, so a short request sends T3 the same text upstream would.

Sentence ends are those of every language the multilingual model speaks: . ! ? (Latin, Cyrillic, Hebrew,
Korean, ...), the full-width 。！？ of Chinese and Japanese (no space after them), the Devanagari danda । ॥, the
Arabic question mark ؟ and, with `language="el"`, the Greek question mark ;. A multilingual checkpoint's chunks
are normalised with upstream `mtl_tts.punc_norm`, which knows the CJK marks too.

Splitting order for an over-long sentence: clause punctuation (, ; : ， 、 ...), then whitespace, then a hard cut.
Pure Python, no torch.
"""
from __future__ import annotations

import re
import unicodedata

DEFAULT_MAX_CHUNK_CHARS = 300

_PUNC_TO_REPLACE = [
    ("...", ", "),
    ("…", ", "),
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("—", "-"),
    ("–", "-"),
    (" ,", ","),
    ("“", "\""),
    ("”", "\""),
    ("‘", "'"),
    ("’", "'"),
]
_SENTENCE_ENDERS = (".", "!", "?", "-", ",")
_MTL_SENTENCE_ENDERS = _SENTENCE_ENDERS + ("、", "，", "。", "？", "！")   # upstream mtl_tts.punc_norm

# Abbreviations whose period does not end a sentence.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig", "mt", "inc", "ltd",
    "co", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "approx", "dept",
    "a.m", "p.m", "u.s",
})
# A sentence ends after . ! ? । ॥ ؟ ۔ ‼ (then closing quotes/brackets) and whitespace or a CJK character; after
# full-width 。！？ (CJK text has no spaces); or at a newline. "..." and "…" are pauses inside a sentence
# (punc_norm turns them into commas), so they do not end one.
_CLOSERS = "\"'”’)\\]」』）】》〕〉"
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_SPACED_ENDS = ".!?\u0964\u0965\u061f\u06d4\u203c\u2047\u2048\u2049"   # . ! ? । ॥ ؟ ۔ ‼ ⁇ ⁈ ⁉
_WIDE_ENDS = "\u3002\uff01\uff1f\uff61\uff0e"                            # 。 ！ ？ ｡ ．
_GREEK_QUESTION = ";\u037e"                                                   # Greek writes ? as ;


def _sentence_end(spaced_ends: str) -> re.Pattern:
    # a full-width end inside a quote that the sentence goes on after (「…。」と言った) does not end it
    return re.compile(f"[{re.escape(spaced_ends)}]+[{_CLOSERS}]*(?=\\s|[{_CJK}])"
                      f"|[{_WIDE_ENDS}]+(?![{_CLOSERS}])|[{_WIDE_ENDS}]+[{_CLOSERS}]+(?=\\s|$)|\\n+")


_WIDE_TEXT = re.compile(f"[{_CJK}{_WIDE_ENDS}{_CLOSERS}\uff0c\u3001\uff1b\uff1a]")


def _join(left: str, right: str) -> str:
    """Two pieces of one chunk: a space between words, none between CJK sentences (the text had none)."""
    if _WIDE_TEXT.match(left[-1]) and _WIDE_TEXT.match(right[0]):
        return left + right
    return f"{left} {right}"


_SENTENCE_END = _sentence_end(_SPACED_ENDS)
_SENTENCE_END_BY_LANGUAGE = {"el": _sentence_end(_SPACED_ENDS + _GREEK_QUESTION)}
_INLINE_SPACE = re.compile(r"[^\S\n]+")
# , ; : — – and the Arabic comma and semicolon before a space; the CJK comma, enumeration comma, semicolon and
# colon anywhere; " - ".
_CLAUSE_END = re.compile(r"[,;:—–\u060c\u061b](?=\s)|[\uff0c\u3001\uff1b\uff1a]|\s-\s")


def punc_norm(text: str, multilingual: bool = False) -> str:
    """Byte-for-byte the same as upstream chatterbox.tts.punc_norm (chatterbox-tts 0.1.7), or with `multilingual`
    as chatterbox.mtl_tts.punc_norm (which also counts 、，。？！ as an ending)."""
    if len(text) == 0:
        return "You need to add some text for me to talk."

    # Capitalise first letter
    if text[0].islower():
        text = text[0].upper() + text[1:]

    # Remove multiple space chars
    text = " ".join(text.split())

    # Replace uncommon/llm punc
    for old_char_sequence, new_char in _PUNC_TO_REPLACE:
        text = text.replace(old_char_sequence, new_char)

    # Add full stop if no ending punc
    text = text.rstrip(" ")
    if not any(text.endswith(p) for p in (_MTL_SENTENCE_ENDERS if multilingual else _SENTENCE_ENDERS)):
        text += "."

    return text


def strip_unspeakable(text: str) -> str:
    """Drop characters with nothing to speak: controls (NUL, ESC, DEL, C1), format marks (zero-width spaces and
    joiners, BOM, bidi marks) and lone surrogates. Whitespace controls (tab, newline, ...) stay whitespace."""
    if text.isprintable():
        return text
    return "".join(c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf", "Cs"))


def _is_abbreviation(text: str, end: int) -> bool:
    """True when the period ending at `end` closes an abbreviation ("Dr.") or an initial ("J.")."""
    if end == 0 or text[end - 1] != ".":
        return False
    start = end - 1
    while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
        start -= 1
    word = text[start:end - 1]
    is_initial = len(word) == 1 and word.isupper()  # "J. R. R. Tolkien"
    return is_initial or word.lower() in _ABBREVIATIONS


def split_sentences(text: str, language: str | None = None) -> list[str]:
    """Sentences with their end punctuation, whitespace trimmed, empty ones dropped."""
    sentences, start = [], 0
    pattern = _SENTENCE_END_BY_LANGUAGE.get((language or "").lower(), _SENTENCE_END)
    for match in pattern.finditer(text):
        end = match.end()
        marks = match.group().rstrip(_CLOSERS)
        if ".." in marks or (marks == "." and _is_abbreviation(text, match.start() + 1)):
            continue  # an ellipsis is a pause, an abbreviation's period is not an end
        piece = text[start:end].strip()
        if piece:
            sentences.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Cuts one over-long sentence at clause punctuation, then whitespace, then anywhere."""
    pieces: list[str] = []
    rest = sentence
    while len(rest) > max_chars:
        window = rest[:max_chars + 1]
        cut = 0
        for match in _CLAUSE_END.finditer(window):
            if match.end() <= max_chars:
                cut = match.end()
        if cut < max_chars // 3:  # no clause break in a useful place: the last space
            space = window.rfind(" ", 0, max_chars + 1)
            cut = space if space > 0 else max_chars
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]


def chunk_text(text: str, max_chunk_chars: int = DEFAULT_MAX_CHUNK_CHARS, *, multilingual: bool = False,
               language: str | None = None) -> list[str]:
    """Normalised text chunks for T3, each at most ~`max_chunk_chars` before normalisation, in order.

    Whole sentences are packed greedily; a sentence longer than the limit is split at clauses or words.
    `multilingual`: normalise as upstream's multilingual model does; `language`: its sentence ends too (Greek ;).
    Unspeakable characters are dropped first (`strip_unspeakable`). Returns [] when nothing is left to speak:
    blank input, or only control characters (the caller rejects it)."""
    if max_chunk_chars < 20:
        raise ValueError(f"max_chunk_chars={max_chunk_chars} is too small to hold a sentence; use >= 20 "
                         f"(default {DEFAULT_MAX_CHUNK_CHARS})")
    text = strip_unspeakable(text)
    if not text.strip():
        return []
    if len(" ".join(text.split())) <= max_chunk_chars:
        return [punc_norm(text, multilingual)]
    text = _INLINE_SPACE.sub(" ", text)
    chunks: list[str] = []
    current = ""
    for sentence in split_sentences(text, language):
        for piece in _split_long(sentence, max_chunk_chars) if len(sentence) > max_chunk_chars else [sentence]:
            candidate = _join(current, piece) if current else piece
            if len(candidate) <= max_chunk_chars:
                current = candidate
            else:
                chunks.append(current)
                current = piece
    if current:
        chunks.append(current)
    return [punc_norm(chunk, multilingual) for chunk in chunks]
