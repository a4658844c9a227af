"""Language-modelling data: a text, tokenized, served as windows of `block_size + 1` tokens.

Every start offset of the token stream is one example: inputs are tokens [i, i+T), targets [i+1, i+T+1).
The last `val_fraction` of the text is held out for validation, as in char-rnn and nanoGPT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from papertrain.config.constraints import OpenUnit, PositiveInt
from papertrain.data.sources import resolve
from papertrain.data.tokenizers import Tokenizer, build_tokenizer
from papertrain.errors import PapertrainError


class TokenWindows:
    """All windows of a token stream; `batch(indices)` gathers them without copying the stream."""

    def __init__(self, tokens: torch.Tensor, block_size: int, name: str = "a split"):
        if len(tokens) <= block_size + 1:
            raise PapertrainError(f"{name} of {len(tokens)} tokens is too short for data.block_size={block_size}",
                                  "use a smaller data.block_size or more text")
        self.tokens = tokens
        self.block_size = block_size
        self._offsets = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        windows = self.tokens[indices[:, None] + self._offsets].long()  # [B, T+1]
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}


def read_text_file(path: Path) -> str:
    """A corpus file's text, with one clear message for a file that is empty, binary or not UTF-8."""
    data = path.read_bytes()
    if not data.strip():
        raise PapertrainError(f"{path} is empty", "point data.path at a text file with the corpus in it")
    if b"\x00" in data[:1 << 16]:
        raise PapertrainError(f"{path} is a binary file, not text (it holds NUL bytes)",
                              "point data.path at a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PapertrainError(f"{path} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 4]!r})",
                              "convert it (e.g. iconv -t utf-8) or point data.path at a UTF-8 text file") from None


class TextCorpus:
    """A registered text data set (or any file via `path`), tokenized and split into train and val."""

    def __init__(self, dataset: str = "tiny_shakespeare", path: str | None = None, tokenizer: str = "char",
                 tokenizer_path: str | None = None, block_size: PositiveInt = 128, val_fraction: OpenUnit = 0.1):
        if not 0.0 < val_fraction < 1.0:
            raise PapertrainError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
        files = resolve(dataset, path)
        self.path = next(iter(files.values()))
        self.text = read_text_file(self.path)
        self.tokenizer: Tokenizer = build_tokenizer(tokenizer, corpus=self.text, path=tokenizer_path)
        dtype = torch.int16 if self.tokenizer.vocab_size < 2**15 else torch.int32
        tokens = torch.tensor(self.tokenizer.encode(self.text), dtype=dtype)
        n_val = int(len(tokens) * val_fraction)
        self.block_size = block_size
        if n_val == 0:
            raise PapertrainError(f"{self.path} holds {len(tokens)} tokens: too few for a validation split of "
                                  f"{val_fraction:g}", "use more text, or a larger data.val_fraction")
        self.train = TokenWindows(tokens[:-n_val], block_size, f"the training split of {self.path}")
        self.val = TokenWindows(tokens[-n_val:], block_size, f"the validation split of {self.path}")

    def describe(self) -> str:
        n_train, n_val = len(self.train.tokens), len(self.val.tokens)
        return (f"{self.path} ({len(self.text):,} chars) -> {n_train:,} train / {n_val:,} val tokens, "
                f"vocab {self.tokenizer.vocab_size}")
