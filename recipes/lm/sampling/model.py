"""
# Decoding: from next-token distributions to text (Holtzman et al., 2020)

A language model gives a distribution P(x | x_{<t}) over the next token; text comes from choosing a
token, appending it, and asking again. How to choose matters as much as the model. "The Curious Case
of Neural Text Degeneration" shows the two obvious answers both fail:

* **Greedy** (and beam search) takes argmax_x P(x | x_{<t}). Maximising likelihood produces bland,
  repetitive text that falls into loops: a repeated phrase makes itself more likely each time (§3).
* **Pure sampling** draws x ~ P(x | x_{<t}). The distribution's long tail of individually unlikely
  tokens holds a lot of mass in total, so some nonsense token is drawn every few steps (§3, §4.1).

Three ways to cut the tail, applied to the logits z before the softmax (in this order):

* **Temperature** τ: P_τ(x) ∝ exp(z_x / τ). τ < 1 sharpens towards greedy (τ -> 0 *is* greedy), τ > 1
  flattens.
* **Top-k** (Fan et al., 2018): keep the k most likely tokens, renormalise. A fixed k is too many when
  the model is sure and too few when it is not.
* **Nucleus (top-p)** (§3.1): keep the smallest set V⁽ᵖ⁾ of most likely tokens whose mass reaches p,

      Σ_{x ∈ V⁽ᵖ⁾} P(x | x_{<t}) ≥ p,       P'(x) = P(x) / Σ_{V⁽ᵖ⁾} P   for x ∈ V⁽ᵖ⁾, else 0     (eq. 3)

  so the candidate set grows and shrinks with the model's confidence.

`Sampler` combines them; `generate` runs the loop for any model that maps [B, T] ids to [B, T, V] logits,
and `stream` yields one prompt's continuation token by token, with a key/value cache where the model has one
(`papertrain generate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary: [B, V] -> [B]."""
    return logits.argmax(dim=-1)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (ties broken by index); the rest become -inf."""
    k = min(k, logits.shape[-1])
    kept = logits.topk(k, dim=-1).indices
    filtered = torch.full_like(logits, float("-inf"))
    return filtered.scatter(-1, kept, logits.gather(-1, kept))


def nucleus_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (eq. 3).

    Sort by probability; token i (in sorted order) is kept if the mass of the tokens *before* it is
    still below p. The most likely token is therefore always kept.
    """
    ordered_logits, order = logits.sort(dim=-1, descending=True)
    probs = ordered_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep_sorted = mass_before < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


@dataclass
class Sampler:
    """temperature -> top-k -> nucleus, then draw. `temperature=0` means greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the distribution actually sampled from (-inf where a token is cut)."""
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None and self.top_p < 1.0:
            logits = nucleus_filter(logits, self.top_p)
        return logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self.filtered_logits(logits).softmax(dim=-1)

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Choose one token per row: [B, V] -> [B]."""
        if self.temperature == 0:
            return greedy(logits)
        return torch.multinomial(self.probabilities(logits), 1, generator=generator).squeeze(-1)

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k is not None:
            parts.append(f"top-k {self.top_k}")
        if self.top_p is not None:
            parts.append(f"nucleus p={self.top_p:g}")
        return ", ".join(parts)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, sampler: Sampler,
             generator: torch.Generator | None = None, context_size: int | None = None) -> torch.Tensor:
    """Extend `prompt` [B, T] by `max_new_tokens`, one token at a time: returns [B, T + max_new_tokens].

    The model sees at most the last `context_size` tokens (its block size).
    """
    ids = prompt
    for _ in range(max_new_tokens):
        window = ids if context_size is None else ids[:, -context_size:]
        logits = model(window)[:, -1]  # [B, V]: the distribution of the next token
        ids = torch.cat([ids, sampler(logits, generator)[:, None]], dim=1)
    return ids


@torch.no_grad()
def stream(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, sampler: Sampler,
           generator: torch.Generator | None = None, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield the continuation of one prompt [1, T] token by token, as soon as each is drawn.

    A model with `new_cache(batch, max_len)` is run with a key/value cache: the prompt once, then one new
    token per step, each attending to the cached keys and values of everything before it (O(T) work
    per token instead of recomputing the whole window, O(T²)). Other models are re-run on their last
    `block_size` tokens each step. Stops early at any of `stop_ids` (not yielded).
    """
    stops = set(stop_ids)
    block = getattr(model, "block_size", None)
    if hasattr(model, "new_cache"):
        room = prompt.shape[1] + max_new_tokens
        if block is not None and room > block:
            raise ValueError(f"prompt ({prompt.shape[1]} tokens) + {max_new_tokens} new tokens exceed the model's "
                             f"context of {block}")
        cache = model.new_cache(prompt.shape[0], room, device=prompt.device)
        logits = model(prompt, cache)[:, -1]
        for _ in range(max_new_tokens):
            token = sampler(logits.float(), generator)  # [1]
            if int(token) in stops:
                return
            yield int(token)
            logits = model(token[:, None], cache)[:, -1]
        return
    ids = prompt
    for _ in range(max_new_tokens):
        window = ids if block is None else ids[:, -block:]
        token = sampler(model(window)[:, -1].float(), generator)
        if int(token) in stops:
            return
        yield int(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
