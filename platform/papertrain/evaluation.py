"""Evaluation and samples, beside the loop.

    evaluator.evaluate(ctx)   validation metrics: the task's own `evaluate_all(ctx)`, or the mean of
                              `task.evaluate(model, batch)` over a fixed validation subset, shared across ranks
    evaluator.sample(ctx)     the task's `sample(model, data, generator)`: text, images, figures, numbers

A metric is averaged weighted by `task.count(batch)` (the units its mean is over), or, when the task
returns it as a `(total, count)` pair, summed as such (e.g. exact matches per sequence). Tasks whose
evaluation is not a pass over validation batches (an RL agent's episodes, a solver's exploitability)
define `evaluate_all(ctx) -> metrics` (means, or `(total, count)` pairs summed over ranks) and are called
once per evaluation instead. `evaluate` and `sample` are given the loop's context when they take `ctx`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from papertrain.data.batches import to_device
from papertrain.data.sampler import evaluation_indices, shard
from papertrain.steps import takes_context


class Evaluator:
    def __init__(self, task: Any, data: Any, strategy: Any, batch_size: int, eval_batches: int, seed: int):
        self.task, self.data, self.strategy = task, data, strategy
        self.batch_size, self.seed = batch_size, seed
        self.evaluate_takes_context = takes_context(getattr(task, "evaluate", None))
        self.indices = None
        val = getattr(data, "val", None)
        if not callable(getattr(task, "evaluate_all", None)) and val is not None:
            count = eval_batches * batch_size
            count -= min(count, len(val)) % strategy.data_world_size  # equal shares for every rank
            self.indices = evaluation_indices(len(val), count)

    @property
    def available(self) -> bool:
        return self.indices is not None or callable(getattr(self.task, "evaluate_all", None))

    def evaluate(self, ctx: Any) -> dict[str, float]:
        """Validation metrics, prefixed `val/`, the same on every rank."""
        model = ctx.raw_model
        was_training = model.training
        model.eval()
        try:
            with self.strategy.whole_model(model):
                means = self._evaluate(model, ctx)
        finally:
            model.train(was_training)
        return {f"val/{k}": v for k, v in means.items()}

    def _evaluate(self, model: Any, ctx: Any) -> dict[str, float]:
        if callable(getattr(self.task, "evaluate_all", None)):
            with torch.no_grad():
                return self._across_ranks(self.task.evaluate_all(ctx))
        return self._over_batches(model, ctx)

    def _across_ranks(self, values: dict[str, Any]) -> dict[str, float]:
        """A rank's metrics: means (averaged over ranks) or (total, count) pairs (summed, then divided)."""
        pairs = {k: v for k, v in values.items() if isinstance(v, tuple)}
        means = self.strategy.mean_across_ranks({k: float(v) for k, v in values.items() if k not in pairs})
        sums = self.strategy.sum_across_ranks({f"{k}/{i}": float(part) for k, v in pairs.items()
                                               for i, part in enumerate(v)})
        return {**means, **{k: sums[f"{k}/0"] / max(sums[f"{k}/1"], 1e-12) for k in pairs}}

    def _over_batches(self, model: Any, ctx: Any) -> dict[str, float]:
        strategy, batch_size, device = self.strategy, self.batch_size, ctx.device
        sums: dict[str, float] = defaultdict(float)
        with torch.no_grad():
            for start in range(0, len(self.indices), batch_size):
                chunk = self.indices[start:start + batch_size]
                local = shard(chunk, strategy.data_rank, strategy.data_world_size, 1, 0)
                batch = to_device(self.data.val.batch(local), device)
                with strategy.autocast():
                    values = (self.task.evaluate(model, batch, ctx=ctx) if self.evaluate_takes_context
                              else self.task.evaluate(model, batch))
                units = float(self.task.count(batch))
                for k, v in values.items():
                    total, count = (float(v[0]), float(v[1])) if isinstance(v, tuple) else (float(v) * units, units)
                    sums[f"{k}/total"] += total
                    sums[f"{k}/count"] += count
        sums = strategy.sum_across_ranks(dict(sums))
        names = sorted({k.rsplit("/", 1)[0] for k in sums})
        return {k: sums[f"{k}/total"] / max(sums[f"{k}/count"], 1e-12) for k in names}

    def sample(self, ctx: Any) -> dict[str, Any]:
        """The task's samples at this step (every rank draws them: a sharded model needs every rank)."""
        if not callable(getattr(self.task, "sample", None)):
            return {}
        generator = torch.Generator(device=ctx.device).manual_seed(self.seed * 7919 + ctx.step)
        model = ctx.raw_model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.strategy.autocast(), self.strategy.whole_model(model):
                if takes_context(self.task.sample):
                    return self.task.sample(model, self.data, generator, ctx=ctx) or {}
                return self.task.sample(model, self.data, generator) or {}
        finally:
            model.train(was_training)


def write_samples(folder: Path, step: int, samples: dict[str, Any]) -> list[Path]:
    """Text samples go into one .txt per step; images (tensors, or matplotlib figures) into PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    texts = {k: v for k, v in samples.items() if isinstance(v, str)}
    if texts:
        path = folder / f"step_{step:08d}.txt"
        if len(texts) == 1:
            path.write_text(next(iter(texts.values())) + "\n")
        else:
            path.write_text("".join(f"=== {k} ===\n{v}\n\n" for k, v in texts.items()))
        written.append(path)
    for name, value in samples.items():
        path = folder / f"step_{step:08d}_{name}.png"
        if isinstance(value, torch.Tensor):
            save_image_grid(value, path)
        elif hasattr(value, "savefig"):  # a matplotlib figure the task drew (axes, labels, colour bars)
            import matplotlib.pyplot as plt

            value.savefig(path, dpi=110)
            plt.close(value)
        else:
            continue
        written.append(path)
    return written


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """[N, C, H, W] or [C, H, W] in [0, 1] -> one PNG, tiled in rows of `columns`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().float().cpu().clamp(0, 1)
    if images.dim() == 3:
        images = images[None]
    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    grid = torch.ones(c, rows * (h + 2), columns * (w + 2))
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    plt.imsave(path, array[..., 0] if c == 1 else array, cmap="gray" if c == 1 else None)
