"""Sequence-to-sequence with the full encoder-decoder: sort a sequence of digits.

The paper trains translation (WMT 2014), which no offline machine has. Sorting keeps what matters about
translation for the architecture: variable-length input and output, padding masks, an output that
depends on the *whole* input (the encoder must read everything before the decoder's first token is
right), teacher forcing in training and greedy decoding at test time.

    source: 7 3 9 3 0        target: <bos> 0 3 3 7 9   ->   0 3 3 7 9 <eos>
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt, Seed
from papertrain.data.tensors import TensorExamples
from papertrain.errors import PapertrainError

PAD, BOS, EOS = 0, 1, 2
FIRST_DIGIT = 3


class SortDigits:
    def __init__(self, n_symbols: PositiveInt = 10, min_len: PositiveInt = 4, max_len: PositiveInt = 12,
                 n_train: PositiveInt = 50_000, n_val: PositiveInt = 1_000, seed: Seed = 0):
        if not 1 <= min_len <= max_len:
            raise PapertrainError(f"need 1 <= data.min_len <= data.max_len, got {min_len}, {max_len}")
        self.n_symbols, self.min_len, self.max_len = n_symbols, min_len, max_len
        self.vocab_size = FIRST_DIGIT + n_symbols
        generator = torch.Generator().manual_seed(seed)
        self.train = self._generate(n_train, generator)
        self.val = self._generate(n_val, generator)

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        min_len, max_len = arguments["min_len"], arguments["max_len"]
        if min_len > max_len:
            yield "min_len", (f"min_len={min_len} is longer than max_len={max_len}; "
                              f"lower min_len to {max_len} or raise max_len to {min_len}")

    def _generate(self, n: int, generator: torch.Generator) -> TensorExamples:
        lengths = torch.randint(self.min_len, self.max_len + 1, (n,), generator=generator)
        symbols = torch.randint(0, self.n_symbols, (n, self.max_len), generator=generator) + FIRST_DIGIT
        real = torch.arange(self.max_len)[None, :] < lengths[:, None]  # [n, max_len]
        source = torch.where(real, symbols, PAD)
        # sort real symbols; padding (pushed to the end with a large key) stays padding
        ordered = torch.where(real, symbols, 10**6).sort(dim=1).values
        ordered = torch.where(real, ordered, PAD)
        target_in = torch.cat([torch.full((n, 1), BOS), ordered], dim=1)  # [n, max_len + 1]
        target_out = torch.cat([ordered, torch.full((n, 1), PAD)], dim=1)
        target_out[torch.arange(n), lengths] = EOS
        return TensorExamples(source=source, target_in=target_in, target_out=target_out)

    def describe(self) -> str:
        return (f"sort {self.min_len}-{self.max_len} symbols of {self.n_symbols}: "
                f"{len(self.train):,} train / {len(self.val):,} val sequences")

    @staticmethod
    def render(tokens: torch.Tensor) -> str:
        words = []
        for t in tokens.tolist():
            if t == EOS:
                break
            if t >= FIRST_DIGIT:
                words.append(str(t - FIRST_DIGIT))
        return " ".join(words)


class SortTask:
    unit = "tokens"

    def prepare(self, model: nn.Module, data: SortDigits) -> None:
        vocab = model.embed.embedding.num_embeddings
        if vocab < data.vocab_size:
            raise PapertrainError(f"model.vocab_size={vocab} is smaller than the data's {data.vocab_size} tokens",
                                  f"set model.vocab_size={data.vocab_size}")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["source"], batch["target_in"])  # teacher forcing: [B, T, vocab]
        target = batch["target_out"]
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=PAD)
        real = target != PAD
        accuracy = ((logits.argmax(-1) == target) & real).sum() / real.sum()
        return loss, {"token_accuracy": accuracy.detach()}

    def evaluate(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss, parts = self.loss(model, batch)
        decoded = model.greedy_decode(batch["source"], BOS, EOS, max_len=batch["target_out"].shape[1])
        exact = _exact_matches(decoded, batch["target_out"])
        # loss and token accuracy are means over tokens; exact match counts sequences: (matches, sequences)
        return {"loss": loss, **parts, "exact_match": (float(exact.sum()), len(exact))}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["target_out"] != PAD).sum())

    def sample(self, model: nn.Module, data: SortDigits, generator: torch.Generator) -> dict[str, str]:
        batch = data.val.batch(torch.arange(8))
        device = next(model.parameters()).device
        decoded = model.greedy_decode(batch["source"].to(device), BOS, EOS, max_len=data.max_len + 1).cpu()
        lines = []
        for source, output, expected in zip(batch["source"], decoded, batch["target_out"]):
            mark = "ok " if data.render(output) == data.render(expected) else "BAD"
            lines.append(f"{mark} {data.render(source):<24} -> {data.render(output)}")
        return {"sorted": "\n".join(lines)}


def _exact_matches(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sequence, 1.0 if it was decoded exactly, up to and including EOS."""
    width = target.shape[1]
    if decoded.shape[1] < width:
        decoded = F.pad(decoded, (0, width - decoded.shape[1]), value=PAD)
    decoded = decoded[:, :width]
    real = target != PAD
    return ((decoded == target) | ~real).all(dim=1).float()
