"""Comparing decoding strategies on one trained language model, as Holtzman et al. do (§4, Table 1).

The run trains the tiny character GPT briefly, then continues the same validation prompts with each
strategy and measures two things per strategy:

* **likelihood**: the mean log-probability per token of the generated text under the model itself
  (untempered). Greedy text is the most likely the model can produce; human text is far less likely
  than that (the paper's Figure 2), and pure sampling's tail draws are least likely of all.
* **diversity**: distinct-2, the fraction of word bigrams in a continuation that are unique
  (Li et al., 2016). Repetition loops drive it down.

The human reference for both is the validation text itself (`human/...`).
"""

from __future__ import annotations

import torch
from torch import nn

from papertrain.config.constraints import PositiveInt
from papertrain.errors import PapertrainError
from papertrain.recipes.lm.sampling.model import Sampler, generate
from papertrain.recipes.transformers.gpt.task import LanguageModelTask

DEFAULT_STRATEGIES = {
    "greedy": {"temperature": 0.0},
    "pure": {"temperature": 1.0},
    "temperature_0.7": {"temperature": 0.7},
    "top_k_10": {"top_k": 10},
    "nucleus_0.9": {"top_p": 0.9},
}


def distinct_n(text: str, n: int = 2) -> float:
    """Unique word n-grams / all word n-grams (1.0: no repetition at all)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def mean_log_likelihood(model: nn.Module, ids: torch.Tensor, start: int, context_size: int) -> float:
    """Mean log P(x_t | x_{<t}) of tokens ids[:, start:], one window of `context_size` at a time."""
    total, count = 0.0, 0
    for end in range(start, ids.shape[1]):
        window = ids[:, max(0, end - context_size):end]
        log_probs = model(window)[:, -1].float().log_softmax(-1)
        total += float(log_probs.gather(-1, ids[:, end:end + 1]).sum())
        count += ids.shape[0]
    return total / count


class DecodingComparisonTask(LanguageModelTask):
    def __init__(self, strategies: dict[str, dict] | None = None, prompts: PositiveInt = 8,
                 prompt_tokens: PositiveInt = 64, continuation_tokens: PositiveInt = 200):
        super().__init__(sample_tokens=continuation_tokens)
        self.samplers = {}
        for name, settings in (strategies or DEFAULT_STRATEGIES).items():
            try:
                self.samplers[name] = Sampler(**settings)
            except (TypeError, ValueError) as err:
                raise PapertrainError(f"task.strategies.{name}: {err}",
                                      "each strategy takes temperature, top_k and/or top_p") from None
        self.prompts, self.prompt_tokens, self.continuation_tokens = prompts, prompt_tokens, continuation_tokens

    def sample(self, model: nn.Module, data, generator: torch.Generator) -> dict[str, object]:
        device = next(model.parameters()).device
        length = self.prompt_tokens + self.continuation_tokens
        starts = torch.linspace(0, len(data.val.tokens) - length - 1, self.prompts).long()
        human = torch.stack([data.val.tokens[s:s + length].long() for s in starts]).to(device)  # [N, L]
        prompts = human[:, :self.prompt_tokens]
        context = model.block_size

        results: dict[str, object] = {}
        table = ["strategy               log-lik/token  distinct-2   (human text: model's view of real data)"]
        rows = {"human": human}
        for name, sampler in self.samplers.items():
            rows[name] = generate(model, prompts, self.continuation_tokens, sampler, generator, context)
        for name, ids in rows.items():
            likelihood = mean_log_likelihood(model, ids, self.prompt_tokens, context)
            texts = [data.tokenizer.decode(row[self.prompt_tokens:].tolist()) for row in ids]
            diversity = sum(distinct_n(t) for t in texts) / len(texts)
            results[f"{name}/log_likelihood"] = likelihood
            results[f"{name}/distinct_2"] = diversity
            label = name if name == "human" else f"{name} ({self.samplers[name].describe()})"
            table.append(f"{label:<36.36} {likelihood:>8.3f} {diversity:>10.3f}")
            results[f"text_{name}"] = (data.tokenizer.decode(ids[0, :self.prompt_tokens].tolist()) + " ▶ "
                                       + texts[0])
        results["comparison"] = "\n".join(table)
        return results
