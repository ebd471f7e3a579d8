from serve_app.model.text_tokenizer import build_bpe_tokenizer


def test_special_ids_match_upstream():
    tok = build_bpe_tokenizer(704)
    assert tok.token_to_id("[STOP]") == 0
    assert tok.token_to_id("[START]") == 255
    assert tok.token_to_id("[UNK]") is not None and tok.token_to_id("[SPACE]") is not None
    assert tok.get_vocab_size() <= 704


def test_space_token_splits_words_and_roundtrips():
    tok = build_bpe_tokenizer(704)
    ids = tok.encode("hello[SPACE]world").ids
    assert tok.token_to_id("[SPACE]") in ids
    assert tok.decode(ids, skip_special_tokens=False).replace(" ", "") == "hello[SPACE]world"


def test_multilingual_has_language_tags():
    tok = build_bpe_tokenizer(2454, multilingual=True)
    assert tok.encode("[fr]bonjour").tokens[0] == "[fr]"
    assert max(tok.get_vocab().values()) < 2454
