"""CLIP's BPE tokenizer (diffjax.text.CLIPTokenizer) against transformers' CLIPTokenizer.

Reference group (transformers; no PyTorch needed). CLIP's released vocabulary cannot be
downloaded here, so the files are a byte-level BPE of CLIP's form trained in this test on a
small corpus (an independent trainer: pieces by CLIP's pattern through the ``regex`` package,
the most frequent adjacent pair merged 400 times; the vocabulary ordered as CLIP's: the 256
byte symbols, the same with ``</w>``, the merges, the two special tokens). Both tokenizers
read the same vocab.json / merges.txt and must give the same ids for prompts inside and
outside the corpus: contractions, punctuation runs, digits, accents, CJK, runs of spaces,
words never seen (merged down to bytes), and a prompt cut to 77 tokens.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from diffjax.text import CLIPTokenizer, TextError

transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")

CORPUS = [
    "a photograph of an astronaut riding a horse",
    "A painting of a fox in the snow, by Claude Monet!!",
    "it's a dog's life; they're here, we've seen it, I'm sure you'll agree and he'd go",
    "the year 2024 had 365 days... or 366?",
    "café crème brûlée, über-cool naïve résumé",
    "東京の夜景 and a red panda eating bamboo",
    "photorealistic, 8k, highly detailed, trending on artstation",
    "a cat sitting on a mat; the cat is orange and the mat is blue",
] * 3
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "An ASTRONAUT   riding\ta horse\n on mars",
    "don't stop: it's 'sunny' (they'll say) -- isn't it?!?",
    "1234567 + 89 = 1234656",
    "crème brûlée à la mode; ÜBER cool",
    "cafe\u0301 cre\u0300me",  # decomposed accents: the corpus's composed words after NFC
    "東京 panda 🐼 emoji",
    "zyxwvut qqq unseen words xylophone",
    "",
    "  leading and trailing spaces  ",
    " ".join(["horse"] * 100),  # cut to 75 tokens + start and end
]
PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
           r"""[^\s\p{L}\p{N}]+""")


def _bytes_table() -> dict[int, str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        table[b] = chr(b) if b in printable else chr(256 + extra)
        extra += b not in printable
    return table


def _train(corpus, merges_wanted: int = 400):
    """(vocab {token: id}, merges [(a, b)]) of a CLIP-form byte-level BPE of ``corpus``."""
    table = _bytes_table()
    words = collections.Counter()
    for text in corpus:
        for piece in regex.findall(PATTERN, " ".join(text.split()).lower()):
            symbols = [table[b] for b in piece.encode("utf-8")]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(merges_wanted):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    symbols = list(table.values())
    symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    vocab, merges = _train(CORPUS)
    root = tmp_path_factory.mktemp("clip_tokenizer")
    (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (root / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return root / "vocab.json", root / "merges.txt"


def test_ids_and_mask_equal_transformers(files):
    vocab, merges = files
    ours = CLIPTokenizer.from_files(vocab, merges)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(vocab.parent))  # its two files
    ids, mask = ours.encode(PROMPTS)
    want = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True)
    assert ids.dtype == np.int32 and ids.shape == mask.shape == (len(PROMPTS), 77)
    for row, prompt in enumerate(PROMPTS):
        assert ids[row].tolist() == want["input_ids"][row], prompt
        assert mask[row].tolist() == [bool(m) for m in want["attention_mask"][row]], prompt
    eos = ours.vocab["<|endoftext|>"]
    assert ids[-1, 0] == ours.vocab["<|startoftext|>"] and ids[-1, 76] == eos and mask[-1].all()
    empty = PROMPTS.index("")
    assert ids[empty, :2].tolist() == [ours.bos, eos] and (ids[empty, 2:] == eos).all()
    assert mask[empty].sum() == 2
    # words of the corpus merge into whole-word symbols; unseen ones stay in pieces
    assert ours.tokens("horse") == [ours.vocab["horse</w>"]]
    assert len(ours.tokens("xylophone")) > 1


def test_bad_files_and_inputs_are_one_line_errors(files, tmp_path):
    vocab, merges = files
    with pytest.raises(TextError, match="not found"):
        CLIPTokenizer.from_files(tmp_path / "missing.json", merges)
    bad = tmp_path / "vocab.json"
    bad.write_text(json.dumps({"a": 0}))
    with pytest.raises(TextError, match="lacks '<\\|startoftext\\|>'"):
        CLIPTokenizer.from_files(bad, merges)
    broken = tmp_path / "merges.txt"
    broken.write_text("#version: 0.2\na b c\n")
    with pytest.raises(TextError, match="line 2"):
        CLIPTokenizer.from_files(vocab, broken)
    tok = CLIPTokenizer.from_files(vocab, merges)
    with pytest.raises(TextError, match="list of texts"):
        tok.encode("a horse")
    with pytest.raises(TextError, match="text 1 is a int"):
        tok.encode(["a horse", 3])
