"""Language modelling (GPT §3.1, eq. 1): maximise Σᵢ log P(uᵢ | u_{<i}), i.e. minimise the mean
cross-entropy of every next token in every window. On characters the loss is in nats per character.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import NonNegativeFloat, NonNegativeInt, PositiveInt, Range
from papertrain.errors import PapertrainError
from papertrain.recipes.lm.sampling.model import Sampler, generate


class LanguageModelTask:
    unit = "tokens"
    loss_unit = "nats/token"  # the loss plot's axis (nats/char on a character tokenizer: see prepare)

    def __init__(self, prompt: str = "\n", sample_tokens: NonNegativeInt = 500, temperature: NonNegativeFloat = 0.8,
                 top_k: PositiveInt | None = None, top_p: Annotated[float, Range(gt=0, le=1)] | None = None):
        self.prompt = prompt
        self.sample_tokens = sample_tokens
        self.sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)

    def prepare(self, model: nn.Module, data) -> None:
        tokenizer_vocab = data.tokenizer.vocab_size
        if model.vocab_size < tokenizer_vocab:
            raise PapertrainError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                                  f"{tokenizer_vocab} tokens ({data.describe()})",
                                  f"set model.vocab_size={tokenizer_vocab}")
        if data.block_size > model.block_size:
            raise PapertrainError(f"data.block_size={data.block_size} is longer than model.block_size="
                                  f"{model.block_size} (the model has no position embedding beyond it)",
                                  f"set model.block_size={data.block_size} or data.block_size={model.block_size}")
        data.tokenizer.encode(self.prompt)  # fail now, not after training, if the prompt cannot be encoded
        if getattr(data.tokenizer, "kind", None) == "char":
            self.loss_unit = "nats/char"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"])  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten()), {}

    def sampled_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                     generators: list[torch.Generator]) -> torch.Tensor:
        """The same loss on labels ŷ drawn from the model's own predictive distribution softmax(logits)
        instead of the data's: what Sophia's Gauss-Newton-Bartlett curvature estimate differentiates
        (recipes/optim/sophia). One generator per sequence of the batch (the trainer seeds each from the
        sequence's place in the global batch)."""
        logits = model(batch["input_ids"])  # [B, T, V]
        with torch.no_grad():
            probabilities = logits.detach().float().softmax(-1)
            labels = torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1)  # ŷ ~ softmax(f): [T]
                                  for p, g in zip(probabilities, generators, strict=True)])  # [B, T]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def evaluate(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        loss, _ = self.loss(model, batch)
        return {"loss": float(loss), "bits_per_token": float(loss) / math.log(2)}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].numel()

    def sample(self, model: nn.Module, data, generator: torch.Generator) -> dict[str, str]:
        device = next(model.parameters()).device
        prompt = torch.tensor([data.tokenizer.encode(self.prompt)], device=device)
        ids = generate(model, prompt, self.sample_tokens, self.sampler, generator, context_size=model.block_size)
        return {"text": data.tokenizer.decode(ids[0].tolist())}
