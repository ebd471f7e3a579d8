"""Text chunking and punctuation normalisation (pure Python; upstream parity where upstream is importable)."""
from __future__ import annotations

import ast
import importlib.util
import random
from pathlib import Path

import pytest

from serve_app.serving.pipeline.chunking import chunk_text, punc_norm, split_sentences, strip_unspeakable

SAMPLES = [
    "", "hello", "hello world", "  lots   of   space  ", "Wait... what?", "A: b; c — d – e", "ellipsis…",
    "“quoted” and ‘single’", "no ending", "Ends with comma,", "ends with dash -", "Trailing spaces   ",
    "x - y", "one ,two", "ünïcödé text", "Mixed!? punctuation...", "\ttabs\nand\nnewlines\n",
]


def upstream_punc_norm(module: str = "tts.py"):
    """Upstream's function, taken from chatterbox/<module>'s source without importing it (that pulls in torch)."""
    spec = importlib.util.find_spec("chatterbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("chatterbox-tts not installed")
    source = (Path(list(spec.submodule_search_locations)[0]) / module).read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "punc_norm")
    namespace: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), f"chatterbox/{module}", "exec"), namespace)
    return namespace["punc_norm"]


def test_punc_norm_matches_upstream():
    upstream = upstream_punc_norm()
    rng = random.Random(0)
    alphabet = "abc XYZ.,;:!?-—–…“”‘’'\"\n\t"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    for text in SAMPLES + fuzz:
        assert punc_norm(text) == upstream(text), repr(text)


def test_multilingual_punc_norm_matches_upstream_mtl():
    upstream = upstream_punc_norm("mtl_tts.py")
    rng = random.Random(1)
    alphabet = "abc 我们。！？，、.,;:!?-—…“”\n"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    for text in SAMPLES + fuzz + ["我们去公园散步吧！", "你好。", "列表、"]:
        assert punc_norm(text, multilingual=True) == upstream(text), repr(text)


def test_short_input_is_exactly_one_punc_norm_chunk():
    text = "hello there... how are you: fine"
    assert chunk_text(text) == [punc_norm(text)]


def test_blank_input_gives_no_chunks():
    assert chunk_text("   \n ") == []


@pytest.mark.parametrize("text", ["\x00\x00\x00", "\x00 \x1b\x7f\n", "\u200b\ufeff\u200d", "\ud800", "\x85\x9f"])
def test_nothing_to_speak_gives_no_chunks(text):
    assert chunk_text(text) == []


def test_unspeakable_characters_are_dropped_from_text():
    assert strip_unspeakable("he\x00llo\u200b wor\x1bld\tok") == "hello world\tok"
    assert chunk_text("he\x00llo") == [punc_norm("hello")]
    assert strip_unspeakable("plain ünïcödé text") == "plain ünïcödé text"


def test_sentences_split_at_ends_not_at_abbreviations_or_ellipses():
    text = "Dr. Smith arrived at 3.5 p.m. today. He said... nothing! Was it J. R. R. Tolkien? Yes, e.g. him."
    assert split_sentences(text) == [
        "Dr. Smith arrived at 3.5 p.m. today.", "He said... nothing!", "Was it J. R. R. Tolkien?", "Yes, e.g. him."]


def test_closing_quotes_stay_with_their_sentence():
    assert split_sentences('He said "stop." Then he left.') == ['He said "stop."', "Then he left."]


def test_long_text_packs_whole_sentences():
    sentences = [f"This is sentence number {i} of the test." for i in range(40)]
    chunks = chunk_text(" ".join(sentences), max_chunk_chars=120)
    assert all(len(c) <= 121 for c in chunks)  # punc_norm may add one period
    # no sentence is cut, and nothing is lost or reordered
    assert " ".join(chunks) == " ".join(sentences)
    assert len(chunks) == pytest.approx(len(" ".join(sentences)) / 120, abs=2)


def test_overlong_sentence_splits_at_clauses_then_words():
    clause = "and then the quick brown fox jumped over the lazy dog"
    sentence = ", ".join([clause] * 12) + "."
    chunks = chunk_text(sentence, max_chunk_chars=100)
    assert len(chunks) > 1 and all(len(c) <= 101 for c in chunks)
    assert all(c.endswith((",", ".")) for c in chunks)  # cut at a clause, each normalised
    words = " ".join(["supercalifragilistic"] * 40)  # no punctuation at all
    chunks = chunk_text(words, max_chunk_chars=100)
    assert all(len(c) <= 101 for c in chunks)
    assert " ".join(c.rstrip(".") for c in chunks).lower() == words


def test_each_chunk_is_normalised():
    text = "first sentence here; with stuff. " * 20
    for chunk in chunk_text(text, max_chunk_chars=80):
        assert chunk[0].isupper() and ";" not in chunk and chunk.endswith(".")


def test_newlines_end_sentences():
    assert split_sentences("Title\nBody text here") == ["Title", "Body text here"]


def test_tiny_limit_is_rejected_with_a_fix():
    with pytest.raises(ValueError, match="max_chunk_chars"):
        chunk_text("x", max_chunk_chars=5)


# -- every script the multilingual model speaks -----------------------------------------------------------------------

@pytest.mark.parametrize("text,language,sentences", [
    ("我们去公园散步吧！然后回家。你好吗？好的", "zh", ["我们去公园散步吧！", "然后回家。", "你好吗？", "好的"]),
    ("今日は晴れです。散歩に行きましょう！「こんにちは。」と彼は言った。", "ja",
     ["今日は晴れです。", "散歩に行きましょう！", "「こんにちは。」と彼は言った。"]),
    ("你好吗?我很好.", "zh", ["你好吗?", "我很好."]),                     # ASCII marks without spaces
    ("यह पहला वाक्य है। यह दूसरा है॥ और तीसरा?", "hi", ["यह पहला वाक्य है।", "यह दूसरा है॥", "और तीसरा?"]),
    ("هل أنت بخير؟ نعم، أنا بخير.", "ar", ["هل أنت بخير؟", "نعم، أنا بخير."]),
    ("Πού είσαι; Είμαι εδώ.", "el", ["Πού είσαι;", "Είμαι εδώ."]),
    ("Wait; then go. Now!", "en", ["Wait; then go.", "Now!"]),            # ; ends only a Greek question
    ("안녕하세요. 반갑습니다! 잘 지내요?", "ko", ["안녕하세요.", "반갑습니다!", "잘 지내요?"]),
    ("Привет. Как дела? Хорошо!", "ru", ["Привет.", "Как дела?", "Хорошо!"]),
    ("שלום. מה שלומך?", "he", ["שלום.", "מה שלומך?"]),
])
def test_sentence_ends_of_every_script(text, language, sentences):
    assert split_sentences(text, language) == sentences


def test_chinese_is_never_cut_mid_sentence():
    """The issue's case: '我们去公园散步吧！' was cut into '我们去公园散步.' and '吧！'."""
    sentence = "我们去公园散步吧！"
    text = "".join([sentence, "今天天气很好。", "你想去吗？"] * 12)
    chunks = chunk_text(text, max_chunk_chars=40, multilingual=True, language="zh")
    assert len(chunks) > 1 and all(len(c) <= 40 for c in chunks)
    assert "".join(chunks) == text                                  # no period added, no spaces inserted
    assert all(c.endswith(("！", "。", "？")) for c in chunks)          # every chunk ends at a sentence end


def test_overlong_cjk_sentence_splits_at_its_commas():
    text = "我们去公园散步，" * 12 + "然后回家。"
    chunks = chunk_text(text, max_chunk_chars=40, multilingual=True)
    assert len(chunks) > 1 and all(c.endswith(("，", "。")) for c in chunks)
    assert "".join(chunks) == text
