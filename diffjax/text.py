"""Tokenizers for text conditioning: built from the training captions (nothing downloaded), or
CLIP's (:class:`CLIPTokenizer`, from a released model's vocabulary files).

GLIDE (issue 13) trains its text encoder jointly with the diffusion model, so the tokenizer
need only cover the captions it is trained on. Two kinds:

- "word": lowercase, split on whitespace; word i of the sorted vocabulary -> id i + 1
  (vocab_size = len(vocab) + 1). A word outside the vocabulary is an error.
- "byte": the UTF-8 bytes of the stripped text (case kept); byte b -> id b + 1
  (vocab_size = 257). Every text is representable.

Id 0 is padding. ``encode`` returns tokens [N, L] int32, right-padded with 0, L the
context length; a text with more than L tokens is an error (never silently truncated).
The tokenizer is saved beside a checkpoint as JSON (``to_json`` / ``save``) and loaded
with it to sample.

Pure Python and NumPy: no jax, no flax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import unicodedata
from collections.abc import Sequence

import numpy as np

FORMAT = "diffjax.tokenizer"
VERSION = 1
KINDS = ("word", "byte")
BYTE_VOCAB_SIZE = 257
_SHOWN_WORDS = 12


class TextError(ValueError):
    """A prompt, caption or tokenizer file is unusable; the one-line message says how to fix it."""


def _short(text: str, limit: int = 60) -> str:
    """text as a one-line repr, cut to about `limit` characters."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Maps texts to tokens [N, L] int32 (0 = padding) and back.

    kind: "word" or "byte"; context_length: L, tokens per text; vocab: the sorted known
    words (word kind only, empty for bytes).
    """

    kind: str
    context_length: int
    vocab: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TextError(f"tokenizer kind {self.kind!r} is unknown; use one of {KINDS}")
        if not isinstance(self.context_length, int) or self.context_length < 1:
            raise TextError(f"context_length={self.context_length!r} must be an integer >= 1")
        if self.kind == "byte" and self.vocab:
            raise TextError("a byte tokenizer has no vocabulary; pass vocab=() or kind='word'")
        if self.kind == "word" and list(self.vocab) != sorted(set(self.vocab)):
            raise TextError("the word vocabulary must be sorted and without duplicates; "
                            "build it with Tokenizer.build")
        object.__setattr__(self, "_ids", {w: i + 1 for i, w in enumerate(self.vocab)})

    @property
    def vocab_size(self) -> int:
        """Number of token ids, padding (0) included."""
        return len(self.vocab) + 1 if self.kind == "word" else BYTE_VOCAB_SIZE

    def _units(self, text: str) -> list[str] | bytes:
        """The words (lowercased) or UTF-8 bytes of one text."""
        return text.lower().split() if self.kind == "word" else text.strip().encode("utf-8")

    def _problem(self, text: object) -> str | None:
        """Why `text` cannot be encoded, or None."""
        if not isinstance(text, str):
            return f"prompt {text!r} is a {type(text).__name__}, not a str; pass texts"
        units = self._units(text)
        if not units:
            return "a prompt is empty or only whitespace; give every prompt some text"
        if len(units) > self.context_length:
            unit = "words" if self.kind == "word" else "UTF-8 bytes"
            return (f"prompt {_short(text)} has {len(units)} tokens ({unit}), more than the "
                    f"context length {self.context_length}; shorten it or train with a "
                    "larger context length")
        if self.kind == "word":
            for word in units:
                if word not in self._ids:
                    shown = ", ".join(self.vocab[:_SHOWN_WORDS])
                    more = ", ..." if len(self.vocab) > _SHOWN_WORDS else ""
                    return (f"word {word!r} of prompt {_short(text)} is not in the vocabulary "
                            f"of {len(self.vocab)} words ({shown}{more}); the tokenizer was "
                            "built from the training captions, so use only their words")
        return None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """texts: N strings -> tokens [N, L] int32, right-padded with 0.

        Every text is checked first; the first unusable one raises TextError."""
        if isinstance(texts, str):
            raise TextError(f"encode takes a list of prompts, got the single str "
                            f"{_short(texts)}; pass [text] (a list or tuple)")
        texts = list(texts)
        if not texts:
            raise TextError("no prompts given: pass at least one, e.g. ['a red circle']")
        for text in texts:
            problem = self._problem(text)
            if problem is not None:
                raise TextError(problem)
        out = np.zeros((len(texts), self.context_length), np.int32)
        for row, text in enumerate(texts):
            units = self._units(text)
            ids = [self._ids[w] for w in units] if self.kind == "word" else [b + 1 for b in units]
            out[row, :len(ids)] = ids
        return out

    def decode(self, tokens: np.ndarray) -> list[str]:
        """tokens [N, L] int (0 = padding, skipped) -> N strings (words joined by spaces)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise TextError(f"decode expects tokens of shape [N, L], got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise TextError(f"token ids must lie in [0, {self.vocab_size}), got "
                            f"[{tokens.min()}, {tokens.max()}]; decode with the tokenizer "
                            "that encoded them")
        out = []
        for row in tokens:
            ids = [int(i) for i in row if i > 0]
            if self.kind == "word":
                out.append(" ".join(self.vocab[i - 1] for i in ids))
            else:
                out.append(bytes(i - 1 for i in ids).decode("utf-8", errors="replace"))
        return out

    @classmethod
    def build(cls, kind: str, texts: Sequence[str], context_length: int) -> Tokenizer:
        """The tokenizer of `kind` covering `texts` (the training captions), L = context_length.

        Raises TextError for an unknown kind, context_length < 1, no texts (word kind) or a
        text longer than context_length tokens."""
        if kind not in KINDS:
            raise TextError(f"tokenizer kind {kind!r} is unknown; use one of {KINDS}")
        if not isinstance(context_length, int) or context_length < 1:
            raise TextError(f"context_length={context_length!r} must be an integer >= 1")
        if isinstance(texts, str):
            raise TextError("build takes a list of captions, got a single str; pass [text]")
        texts = list(texts)
        if kind == "word" and not texts:
            raise TextError("no captions given to build a word tokenizer from; pass the "
                            "training captions")
        for text in texts:
            if not isinstance(text, str):
                raise TextError(f"caption {text!r} is a {type(text).__name__}, not a str")
        probe = cls(kind, context_length)
        counts = [len(probe._units(t)) for t in texts]
        for text, n in zip(texts, counts):
            if n > context_length:
                raise TextError(f"caption {_short(text)} has {n} tokens, more than the context "
                                f"length {context_length}; raise the context length to at "
                                f"least {max(counts)}")
        if kind == "byte":
            return probe
        words = sorted({w for t in texts for w in t.lower().split()})
        return cls(kind, context_length, tuple(words))

    def to_json(self) -> str:
        """The tokenizer as a JSON object (format, version, kind, context_length, vocab)."""
        return json.dumps({"format": FORMAT, "version": VERSION, "kind": self.kind,
                           "context_length": self.context_length, "vocab": list(self.vocab)})

    @classmethod
    def from_json(cls, s: str, source: str = "tokenizer") -> Tokenizer:
        """The tokenizer `to_json` wrote; TextError naming `source` if `s` is not one."""
        try:
            obj = json.loads(s)
        except ValueError as e:
            raise TextError(f"{source} is not valid JSON ({str(e).splitlines()[0]}); "
                            "delete it and retrain, or restore it from the checkpoint") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise TextError(f"{source} is not a diffjax tokenizer (its 'format' is not "
                            f"{FORMAT!r}); point at the tokenizer.json saved with the model")
        if obj.get("version") != VERSION:
            raise TextError(f"{source} has tokenizer version {obj.get('version')!r}, this "
                            f"diffjax reads version {VERSION}; retrain or upgrade diffjax")
        kind, length, vocab = obj.get("kind"), obj.get("context_length"), obj.get("vocab")
        if not isinstance(kind, str) or type(length) is not int or not isinstance(vocab, list) \
                or not all(isinstance(w, str) for w in vocab):
            raise TextError(f"{source} is corrupt: 'kind' must be a str, 'context_length' an "
                            "int and 'vocab' a list of str; delete it and retrain")
        try:
            return cls(kind, length, tuple(vocab))
        except TextError as e:
            raise TextError(f"{source} is corrupt: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Writes `to_json` to path atomically (a temporary file in the same folder, renamed)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer saved at path; TextError if it is missing or corrupt."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise TextError(f"tokenizer {path} not found: train the model first or pass the "
                            "path of the tokenizer.json saved with it") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TextError(f"tokenizer {path} cannot be read ({e}); check the path and "
                            "its permissions") from None
        return cls.from_json(text, source=path)


# ----------------------------------------------------------------------------- CLIP's BPE

CLIP_CONTEXT_LENGTH = 77
_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE: the printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _char_kind(ch: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace, else '.' (the classes of CLIP's pattern)."""
    if ch.isspace():
        return " "
    cat = unicodedata.category(ch)
    return cat[0] if cat[0] in "LN" else "."


def _clip_pieces(text: str) -> list[str]:
    """CLIP's pre-tokenisation (``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
    [\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``, alternatives tried in that order at each
    position, whitespace between pieces dropped) of lower-cased text."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        special = next((s for s in _CLIP_SPECIAL if text.startswith(s, i)), None)
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        kind = _char_kind(text[i])
        if special or contraction:
            piece = special or contraction
        elif kind == " ":
            i += 1
            continue
        elif kind == "N":
            piece = text[i]
        else:
            j = i + 1
            while j < n and _char_kind(text[j]) == kind:
                j += 1
            piece = text[i:j]
        pieces.append(piece)
        i += len(piece)
    return pieces


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (SD 1.x's ``tokenizer/``) from the released model's
    ``vocab.json`` ({token: id}) and ``merges.txt`` (one merge per line, most frequent first).

    ``encode(texts)`` -> (ids [N, L] int32, mask [N, L] bool), L = context_length (SD: 77):
    ``<|startoftext|>``, the text's tokens (cut to L - 2), ``<|endoftext|>``, then
    ``pad_token`` (SD 1.x: ``<|endoftext|>``); mask True up to the end token. The text is
    normalised as transformers' tokenizers-backed ``CLIPTokenizer`` does (Unicode NFC, lower
    case; ftfy's repairs are not applied), split by CLIP's pattern, and
    each piece's UTF-8 bytes merged pair by pair in the merges' order, its last symbol
    marked with ``</w>``. Pure Python: no jax.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 context_length: int = CLIP_CONTEXT_LENGTH, pad_token: str = "<|endoftext|>",
                 source: str = "CLIP tokenizer") -> None:
        for token in (*_CLIP_SPECIAL, pad_token):
            if token not in vocab:
                raise TextError(f"{source}: the vocabulary lacks {token!r}; is it CLIP's "
                                "vocab.json?")
        if context_length < 2:
            raise TextError(f"{source}: context_length={context_length} leaves no room for "
                            "the start and end tokens")
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.context_length = context_length
        self.bos, self.eos = vocab[_CLIP_SPECIAL[0]], vocab[_CLIP_SPECIAL[1]]
        self.pad = vocab[pad_token]
        self._bytes = _byte_alphabet()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                   **options) -> CLIPTokenizer:
        """The tokenizer of a released ``vocab.json`` and ``merges.txt`` (``options``:
        context_length, pad_token); TextError (one line) for a missing or unreadable file."""
        try:
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError as e:
            raise TextError(f"CLIP tokenizer file {e.filename} not found: pass the released "
                            "model's tokenizer/vocab.json and tokenizer/merges.txt") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TextError(f"CLIP tokenizer files {os.fspath(vocab_path)}, "
                            f"{os.fspath(merges_path)} cannot be read ({e})") from None
        if not isinstance(vocab, dict):
            raise TextError(f"{os.fspath(vocab_path)} holds no {{token: id}} object")
        merges = []
        for number, line in enumerate(lines, 1):
            if not line or (number == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise TextError(f"{os.fspath(merges_path)} line {number}: {_short(line)} is "
                                "not a merge of two symbols")
            merges.append((pair[0], pair[1]))
        return cls(vocab, merges, source=os.fspath(vocab_path), **options)

    def _bpe(self, piece: str) -> list[int]:
        """The ids of one pre-token (cached)."""
        if piece in self._cache:
            return self._cache[piece]
        if piece in _CLIP_SPECIAL:
            out = [self.vocab[piece]]
        else:
            symbols = [self._bytes[b] for b in piece.encode("utf-8")]
            symbols[-1] += "</w>"
            while len(symbols) > 1:  # the pair merged first in training, while one is here
                first, second = min(zip(symbols, symbols[1:]),
                                    key=lambda pair: self.ranks.get(pair, math.inf))
                if (first, second) not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(symbols):  # every occurrence of the pair, left to right
                    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                        merged.append(first + second)
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
            out = [self.vocab.get(s, self.eos) for s in symbols]  # unknown: <|endoftext|>
        self._cache[piece] = out
        return out

    def tokens(self, text: str) -> list[int]:
        """The ids of ``text`` alone (no start, end or padding tokens)."""
        text = unicodedata.normalize("NFC", text).lower()  # whitespace only separates pieces
        return [i for piece in _clip_pieces(text) for i in self._bpe(piece)]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, context_length] int32, mask [N, context_length] bool); see the class."""
        if isinstance(texts, str):
            raise TextError("CLIPTokenizer.encode takes a list of texts, got one string")
        n = self.context_length
        ids = np.full((len(texts), n), self.pad, np.int32)
        mask = np.zeros((len(texts), n), bool)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TextError(f"CLIPTokenizer.encode: text {row} is a "
                                f"{type(text).__name__}, not a string")
            body = [self.bos, *self.tokens(text)[:n - 2], self.eos]
            ids[row, :len(body)] = body
            mask[row, :len(body)] = True
        return ids, mask
