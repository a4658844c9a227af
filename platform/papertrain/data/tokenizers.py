"""Tokenizers: characters, and GPT-2's byte-level BPE built from local vocabulary files.

Both map text to integer ids and back. `build_tokenizer("char", text)` or `build_tokenizer("gpt2")`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from papertrain.errors import PapertrainError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> dict: ...


class CharTokenizer:
    """One id per distinct character of the corpus, in sorted order (tiny Shakespeare: 65)."""

    def __init__(self, alphabet: str):
        self.alphabet = "".join(sorted(set(alphabet)))
        self.ids = {ch: i for i, ch in enumerate(self.alphabet)}
        self.vocab_size = len(self.alphabet)

    @classmethod
    def from_corpus(cls, text: str) -> CharTokenizer:
        return cls(text)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[ch] for ch in text]
        except KeyError:
            unknown = sorted({ch for ch in text if ch not in self.ids})
            raise PapertrainError(f"characters not in this model's alphabet: {unknown!r}",
                                  f"use only these {self.vocab_size} characters: {self.alphabet!r}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)

    def to_json(self) -> dict:
        return {"type": "char", "alphabet": self.alphabet}


# --- GPT-2 byte-level BPE --------------------------------------------------------------------------------
# GPT-2 never sees raw text: it sees UTF-8 bytes, each drawn as a printable unicode character so that
# the merge table is plain text. The text is first split into word-like pieces (the pattern below keeps
# a leading space with its word, and English contractions apart); within each piece, the ranked merges
# of vocab.bpe are applied lowest rank first until no listed pair is left. Each final symbol is one id.

GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_to_symbol() -> dict[int, str]:
    """Printable bytes stand for themselves; the other 68 bytes take the code points 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    next_free = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_free)
            next_free += 1
    return table


class GPT2Tokenizer:
    """GPT-2's tokenizer (50,257 ids) from `encoder.json` and `vocab.bpe`, no network needed."""

    def __init__(self, encoder_json: str | Path, vocab_bpe: str | Path):
        import regex

        self.files = {"encoder.json": str(encoder_json), "vocab.bpe": str(vocab_bpe)}
        self.encoder: dict[str, int] = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        self.decoder = {i: s for s, i in self.encoder.items()}
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#version")]
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.split = regex.compile(GPT2_SPLIT_PATTERN)
        self.symbol_of = byte_to_symbol()
        self.byte_of = {s: b for b, s in self.symbol_of.items()}
        self.vocab_size = len(self.encoder)
        self.eot_id = self.encoder.get("<|endoftext|>")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_registry(cls, path: str | None = None) -> GPT2Tokenizer:
        from papertrain.data.sources import resolve

        files = resolve("gpt2_bpe", path)
        return cls(files["encoder.json"], files["vocab.bpe"])

    def _merge(self, piece: str) -> list[str]:
        """Apply the ranked merges to one pre-split piece, lowest rank first."""
        symbols = list(piece)
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.split.findall(text):
            cached = self._cache.get(piece)
            if cached is None:
                symbols = "".join(self.symbol_of[b] for b in piece.encode("utf-8"))
                cached = [self.encoder[s] for s in self._merge(symbols)]
                if len(self._cache) < 100_000:
                    self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(self.byte_of[ch] for i in ids for ch in self.decoder[i])
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": "gpt2", **self.files}


def build_tokenizer(kind: str, corpus: str | None = None, path: str | None = None) -> Tokenizer:
    """`char` (alphabet from `corpus`) or `gpt2` (BPE files from `path` or the data registry)."""
    if kind == "char":
        if corpus is None:
            raise ValueError("a char tokenizer needs the corpus to read its alphabet from")
        return CharTokenizer.from_corpus(corpus)
    if kind == "gpt2":
        return GPT2Tokenizer.from_registry(path)
    raise PapertrainError(f"unknown tokenizer '{kind}'", "use tokenizer: char or tokenizer: gpt2")


def tokenizer_from_json(state: dict) -> Tokenizer:
    """Rebuild a tokenizer saved with `to_json()` (e.g. from a run directory, for generation)."""
    if state.get("type") == "char":
        return CharTokenizer(state["alphabet"])
    if state.get("type") == "gpt2":
        files = (Path(state["encoder.json"]), Path(state["vocab.bpe"]))
        if all(f.is_file() for f in files):
            return GPT2Tokenizer(*files)
        return GPT2Tokenizer.from_registry()
    raise PapertrainError(f"cannot rebuild tokenizer from {state!r}")
