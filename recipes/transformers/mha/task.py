"""Dictionary lookup: the task that shows what attention is.

An example is a dictionary of `n_entries` entries, each one token that stands for a (key, value) pair,
in random order, followed by a query token naming one of the keys. The label is the value stored under
that key. Chance accuracy is 1/n_values; a network without attention cannot read the right entry.

    entries: (k3, v7) (k0, v2) (k9, v9) ...   query: k0   ->   answer: v2
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt, Seed
from papertrain.data.tensors import TensorExamples
from papertrain.errors import PapertrainError


class DictionaryLookup:
    """Generated dictionaries; entry token = key·n_values + value, query token = n_keys·n_values + key."""

    def __init__(self, n_keys: PositiveInt = 16, n_values: PositiveInt = 16, n_entries: PositiveInt = 8,
                 n_train: PositiveInt = 50_000, n_val: PositiveInt = 2_000, seed: Seed = 0):
        if n_entries > n_keys:
            raise PapertrainError(f"data.n_entries={n_entries} needs at least as many distinct keys "
                                  f"(data.n_keys={n_keys})", "raise data.n_keys or lower data.n_entries")
        self.n_keys, self.n_values, self.n_entries = n_keys, n_values, n_entries
        self.vocab_size = n_keys * n_values + n_keys
        self.n_classes = n_values
        generator = torch.Generator().manual_seed(seed)
        self.train = self._generate(n_train, generator)
        self.val = self._generate(n_val, generator)

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """The entries of one dictionary have distinct keys, so there must be at least as many keys."""
        n_entries, n_keys = arguments["n_entries"], arguments["n_keys"]
        if n_entries > n_keys:
            yield "n_entries", (f"n_entries={n_entries} needs at least as many distinct keys (n_keys={n_keys}); "
                                f"raise n_keys to {n_entries} or lower n_entries to {n_keys}")

    def _generate(self, n: int, generator: torch.Generator) -> TensorExamples:
        keys = torch.rand(n, self.n_keys, generator=generator).argsort(dim=1)[:, :self.n_entries]  # distinct
        values = torch.randint(0, self.n_values, (n, self.n_entries), generator=generator)
        asked = torch.randint(0, self.n_entries, (n,), generator=generator)  # which entry the query names
        query = self.n_keys * self.n_values + keys[torch.arange(n), asked]
        tokens = torch.cat([keys * self.n_values + values, query[:, None]], dim=1)  # [n, n_entries + 1]
        return TensorExamples(tokens=tokens, label=values[torch.arange(n), asked], position=asked)

    def describe(self) -> str:
        return (f"dictionary lookup: {self.n_entries} entries of {self.n_keys} keys x {self.n_values} values, "
                f"{len(self.train):,} train / {len(self.val):,} val (chance accuracy {1 / self.n_values:.3f})")

    def render(self, tokens: torch.Tensor) -> str:
        """'k3:v7 k0:v2 ... ? k0' for one example."""
        entries = [f"k{int(t) // self.n_values}:v{int(t) % self.n_values}" for t in tokens[:-1]]
        return " ".join(entries) + f" ? k{int(tokens[-1]) - self.n_keys * self.n_values}"


class LookupTask:
    unit = "samples"

    def prepare(self, model: nn.Module, data: DictionaryLookup) -> None:
        if model.embedding.num_embeddings < data.vocab_size:
            raise PapertrainError(f"model.vocab_size={model.embedding.num_embeddings} is smaller than the "
                                  f"data's {data.vocab_size} tokens", f"set model.vocab_size={data.vocab_size}")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["tokens"])
        accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
        return F.cross_entropy(logits.float(), batch["label"]), {"accuracy": accuracy.detach()}

    def evaluate(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss, parts = self.loss(model, batch)
        return {"loss": loss, **parts}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["label"])

    def sample(self, model: nn.Module, data: DictionaryLookup, generator: torch.Generator) -> dict[str, object]:
        """Where did each query look? The last layer's attention from the query, per head, as heatmaps."""
        batch = data.val.batch(torch.arange(6))
        device = next(model.parameters()).device
        logits, maps = model(batch["tokens"].to(device), return_weights=True)
        from_query = maps[-1][:, :, -1, :-1].float().cpu()  # [N, H, n_entries]: the query's row, entries only
        answers = logits.argmax(-1).cpu()
        lines = []
        for i in range(len(answers)):
            looked = int(from_query[i].mean(0).argmax())
            lines.append(f"{data.render(batch['tokens'][i])}  ->  v{int(answers[i])} "
                         f"(true v{int(batch['label'][i])}; most attention on entry {looked}, "
                         f"the right one is {int(batch['position'][i])})")
        return {"lookups": "\n".join(lines), "attention": self._heatmaps(data, batch, from_query, answers)}

    @staticmethod
    def _heatmaps(data: DictionaryLookup, batch: dict[str, torch.Tensor], weights: torch.Tensor,
                  answers: torch.Tensor) -> object:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n, heads, entries = weights.shape
        fig, axes = plt.subplots(n, 1, figsize=(1.1 * entries + 1.5, 0.45 * heads * n + 1.2), squeeze=False)
        for i, ax in enumerate(axes[:, 0]):
            ax.imshow(weights[i].numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
            tokens = batch["tokens"][i]
            ax.set_xticks(range(entries), [f"k{int(t) // data.n_values}:v{int(t) % data.n_values}"
                                           for t in tokens[:-1]], fontsize=7)
            ax.set_yticks(range(heads), [f"head {h}" for h in range(heads)], fontsize=7)
            right = int(batch["position"][i])
            ax.add_patch(plt.Rectangle((right - 0.5, -0.5), 1, heads, fill=False, edgecolor="red", linewidth=2))
            query = int(tokens[-1]) - data.n_keys * data.n_values
            ax.set_title(f"query k{query} -> answered v{int(answers[i])} (red: the entry holding k{query})",
                         fontsize=8)
        fig.suptitle("attention from the query to each dictionary entry", fontsize=10)
        fig.tight_layout()
        return fig
