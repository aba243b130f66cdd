"""Tokenizers built from the training captions (diffjax.text, issue 13).

Exact ids (word: sorted order + 1; byte: byte + 1; 0 = padding), round trips through
encode/decode and JSON, and every TextError: one line, naming what is wrong.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffjax.text import TextError, Tokenizer

CAPTIONS = ["a red circle", "A blue Square", "two red squares  on grass"]


def _word(length: int = 6) -> Tokenizer:
    return Tokenizer.build("word", CAPTIONS, length)


def _raises(fn, *needles: str) -> str:
    with pytest.raises(TextError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_word_vocab_and_ids_are_exact():
    tok = _word()
    assert tok.vocab == ("a", "blue", "circle", "grass", "on", "red", "square", "squares",
                         "two")
    assert tok.vocab_size == 10
    out = tok.encode(["A red circle", "two squares on grass"])
    assert out.dtype == np.int32 and out.shape == (2, 6)
    np.testing.assert_array_equal(out, [[1, 6, 3, 0, 0, 0], [9, 8, 5, 4, 0, 0]])
    assert tok.decode(out) == ["a red circle", "two squares on grass"]


def test_byte_ids_are_exact_and_keep_case():
    tok = Tokenizer.build("byte", [], 8)
    assert tok.vocab == () and tok.vocab_size == 257
    out = tok.encode(["  Hé! ", "ab"])
    np.testing.assert_array_equal(out, [[ord("H") + 1, 0xC3 + 1, 0xA9 + 1, ord("!") + 1, 0, 0,
                                         0, 0], [98, 99, 0, 0, 0, 0, 0, 0]])
    assert tok.decode(out) == ["Hé!", "ab"]


def test_round_trip_of_every_caption_fills_exactly_l():
    tok = _word(5)
    out = tok.encode(CAPTIONS)
    assert out.shape == (3, 5) and out[2, 4] != 0 and out[0, 3] == 0
    assert tok.decode(out) == [" ".join(c.lower().split()) for c in CAPTIONS]


def test_encode_errors_are_one_line_and_name_the_problem():
    tok = _word(5)
    _raises(lambda: tok.encode([]), "no prompts given", "e.g.")
    _raises(lambda: tok.encode("a red circle"), "list", "'a red circle'")
    _raises(lambda: tok.encode(["a red circle", "   "]), "empty")
    _raises(lambda: tok.encode(["a red a red a red"]), "6 tokens", "context length 5",
            "shorten")
    msg = _raises(lambda: tok.encode(["a red circle", "a green\ncircle"]), "'green'",
                  "'a green circle'", "training captions", "blue")
    assert "a, blue, circle" in msg
    # the first bad text is reported, before any other
    _raises(lambda: tok.encode(["a purple circle", "a red a red a red"]), "'purple'")
    _raises(lambda: Tokenizer.build("byte", [], 3).encode(["abcd"]), "4 tokens",
            "context length 3")


def test_build_errors():
    _raises(lambda: Tokenizer.build("bpe", CAPTIONS, 4), "'bpe'", "word")
    _raises(lambda: Tokenizer.build("word", CAPTIONS, 0), "context_length=0")
    _raises(lambda: Tokenizer.build("word", [], 4), "no captions")
    _raises(lambda: Tokenizer.build("word", CAPTIONS, 4), "'two red squares on grass'",
            "5 tokens", "at least 5")


def test_json_round_trip_and_bad_json(tmp_path):
    for tok in (_word(), Tokenizer.build("byte", ["x"], 7)):
        assert Tokenizer.from_json(tok.to_json()) == tok
    obj = json.loads(_word().to_json())
    assert obj["format"] == "diffjax.tokenizer" and obj["version"] == 1
    _raises(lambda: Tokenizer.from_json("{", source="ckpt/tok.json"), "ckpt/tok.json", "JSON")
    _raises(lambda: Tokenizer.from_json(json.dumps({**obj, "format": "x"})), "not a diffjax")
    _raises(lambda: Tokenizer.from_json(json.dumps({**obj, "context_length": "6"})),
            "context_length")
    _raises(lambda: Tokenizer.from_json(json.dumps({**obj, "vocab": [1, 2]})), "vocab")
    _raises(lambda: Tokenizer.from_json(json.dumps({**obj, "vocab": ["b", "a"]})), "sorted")


def test_save_load(tmp_path):
    tok = _word()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    tok.save(path)  # overwrite
    assert os.listdir(tmp_path) == ["tokenizer.json"]  # no temporary file left behind
    assert Tokenizer.load(path) == tok
    np.testing.assert_array_equal(Tokenizer.load(path).encode(CAPTIONS), tok.encode(CAPTIONS))
    _raises(lambda: Tokenizer.load(tmp_path / "missing.json"), "not found", "train the model")
    (tmp_path / "bad.json").write_text('{"format": "diffjax.tok')
    _raises(lambda: Tokenizer.load(tmp_path / "bad.json"), "bad.json", "not valid JSON")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    _raises(lambda: Tokenizer.load(tmp_path / "other.json"), "other.json", "not a diffjax")
