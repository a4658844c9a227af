"""Quantise a trained language model with LLM.int8() and measure what it costs (the paper's question in
§3.4: does int8 inference keep full-precision quality?).

The run trains the tiny character GPT, then, on the same validation windows, compares

* **fp32**: the trained model as it is;
* **int8**: every linear layer but the tied output head converted to this recipe's `Int8Linear`
  (vector-wise quantisation + mixed-precision decomposition at α = 6);
* **int8_no_decomposition**: the same with α = ∞, i.e. vector-wise int8 alone (the paper's ablation);
* **bitsandbytes**: the same layers converted to `bnb.nn.Linear8bitLt(threshold=6.0)` (if installed);

by validation loss, the relative error of the logits per token (‖z_int8 − z‖ / ‖z‖), how often the most
likely next token is unchanged, and bytes per parameter of the converted layers. It also counts the
outlier feature dimensions (§4) the int8 layers saw: the inputs with some |x| >= α.

A 0.8M-parameter model has no emergent outliers: they appear from about 6.7B parameters (§4). So the run
repeats the comparison on a copy of the model with **planted** outlier features: in every block, a few
feature dimensions of the two pre-norm LayerNorms are scaled up by `plant_scale` (gain and bias) and the
matching weight columns of the linear layer that reads them scaled down by the same factor. In exact
arithmetic the model computes the same function, but the attention and FFN inputs now carry a few
systematic large-magnitude dimensions in every token, the situation §3.2 is about.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import NonNegativeInt, PositiveFloat, PositiveInt, Range
from papertrain.errors import PapertrainError
from papertrain.recipes.quantization.llm_int8.model import THRESHOLD, Int8Linear, outlier_dims, quantize_linears
from papertrain.recipes.transformers.gpt.task import LanguageModelTask


@torch.no_grad()
def logits_and_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, float]:
    """All logits [N, T, V] (float32) and the mean next-token cross-entropy over the batches."""
    logits = torch.cat([model(b["input_ids"]).float() for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    return logits, float(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def relative_errors(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """‖z − z_ref‖ / ‖z_ref‖ for every token position: [N, T, V] -> [N·T]."""
    return ((logits - reference).norm(dim=-1) / reference.norm(dim=-1)).flatten()


@torch.no_grad()
def plant_outlier_features(model: nn.Module, dims: list[int], scale: float) -> None:
    """Give a pre-norm GPT outlier feature dimensions without changing its function (in exact arithmetic).

    Each block computes linear(LayerNorm(h)) = W (γ ⊙ n + β) + b. Multiplying γ_j and β_j by `scale` and
    dividing column j of W by it leaves the product unchanged, but the LayerNorm output, the int8 layer's
    input, now has |x_j| ~ scale in every token.
    """
    layers = getattr(model, "layers", None)
    if layers is None or not all(getattr(layer, "norm_first", False) for layer in layers):
        raise PapertrainError("planting outlier features needs a pre-norm GPT (model.norm_first: true)",
                              "set model.norm_first=true, or task.plant_dims=[] to skip the planted comparison")
    d_model = layers[0].norm1.weight.shape[0]
    if any(not 0 <= d < d_model for d in dims):
        raise PapertrainError(f"task.plant_dims={list(dims)} must lie in 0 .. {d_model - 1} (model.d_model)",
                              f"pick dimensions below {d_model}")
    for layer in layers:
        for norm, linear in ((layer.norm1, layer.attention.qkv_proj), (layer.norm2, layer.ffn.linear1)):
            norm.weight[dims] *= scale  # γ_j
            norm.bias[dims] *= scale  # β_j
            linear.weight[:, dims] /= scale  # W_{:, j}


class Int8ComparisonTask(LanguageModelTask):
    def __init__(self, threshold: PositiveFloat = THRESHOLD, skip: list[str] | tuple[str, ...] = ("lm_head",),
                 backends: list[str] | tuple[str, ...] = ("own", "bitsandbytes"), eval_windows: PositiveInt = 64,
                 eval_batch_size: PositiveInt = 16,
                 plant_dims: Annotated[list[int] | tuple[int, ...], Range(ge=0)] = (13, 64, 101),  # each >= 0
                 plant_scale: PositiveFloat = 20.0, prompt: str = "\n", sample_tokens: NonNegativeInt = 200):
        super().__init__(prompt=prompt, sample_tokens=sample_tokens)
        if eval_windows < 1 or eval_batch_size < 1:
            raise PapertrainError(f"task.eval_windows={eval_windows} and task.eval_batch_size={eval_batch_size} "
                                  "must be >= 1", "e.g. task.eval_windows=64 task.eval_batch_size=16")
        self.threshold, self.skip, self.backends = float(threshold), tuple(skip), tuple(backends)
        self.eval_windows, self.eval_batch_size = eval_windows, eval_batch_size
        self.plant_dims, self.plant_scale = list(plant_dims), float(plant_scale)

    def _val_batches(self, data, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """`eval_windows` windows spread evenly over the validation text, in batches."""
        starts = torch.linspace(0, len(data.val) - 1, self.eval_windows).long()
        return [{k: v.to(device) for k, v in data.val.batch(chunk).items()}
                for chunk in starts.split(self.eval_batch_size)]

    def _variants(self) -> dict[str, tuple[str, float]]:
        variants = {}
        if "own" in self.backends:
            variants["int8"] = ("own", self.threshold)
            variants["int8_no_decomposition"] = ("own", math.inf)
        if "bitsandbytes" in self.backends:
            variants["bitsandbytes"] = ("bitsandbytes", self.threshold)
        return variants

    def sample(self, model: nn.Module, data, generator: torch.Generator) -> dict[str, object]:
        device = next(model.parameters()).device
        batches = self._val_batches(data, device)
        reference, reference_loss = logits_and_loss(model, batches)  # the trained fp32 model's
        results: dict[str, object] = {}
        header = (f"{self.eval_windows} validation windows of {batches[0]['input_ids'].shape[1]} tokens. "
                  f"err: ‖z − z_fp32‖ / ‖z_fp32‖ per token, against the trained fp32 model; top-1 =: same "
                  f"most likely token as it; B/param: bytes per parameter of the converted linear layers\n"
                  f"{'model':<24} {'val loss':>8} {'Δ loss':>9} {'mean err':>9} {'max err':>9} {'top-1 =':>8} "
                  f"{'B/param':>7}")
        table, notes, int8_model = self._compare(model, "", batches, reference, reference_loss, results,
                                                 fp32=(reference, reference_loss))
        sections = [header + "\n" + table, notes]
        if self.plant_dims:
            planted = copy.deepcopy(model)
            plant_outlier_features(planted, self.plant_dims, self.plant_scale)
            table, notes, _ = self._compare(planted, "planted/", batches, reference, reference_loss, results)
            sections += [f"--- the same model with planted outlier features: dims {self.plant_dims} of every "
                         f"attention and FFN input scaled by {self.plant_scale:g} (weights compensate) ---\n"
                         + table, notes]
        results["comparison"] = "\n\n".join(s for s in sections if s)
        if int8_model is not None:  # what the int8 model writes
            results["text_int8"] = super().sample(int8_model, data, generator)["text"]
        return results

    def _compare(self, model: nn.Module, prefix: str, batches: list[dict[str, torch.Tensor]],
                 reference: torch.Tensor, reference_loss: float, results: dict[str, object],
                 fp32: tuple[torch.Tensor, float] | None = None) -> tuple[str, str, nn.Module | None]:
        """fp32 `model` and its int8 conversions against the reference logits: table rows, outlier notes,
        and the converted `int8` model. Numbers go into `results` as `<prefix><variant>/<measure>`.
        `fp32`: the model's own logits and loss when they are already known."""
        rows, all_logits, bytes_before = [], {}, None
        outlier_note, int8_model = "", None
        variants: dict[str, tuple[str, float] | None] = {"fp32": None, **self._variants()}
        for name, variant in variants.items():
            converted = model if variant is None else copy.deepcopy(model).eval()
            if variant is None:
                report = None
            else:
                try:
                    report = quantize_linears(converted, backend=variant[0], threshold=variant[1], skip=self.skip)
                except PapertrainError as err:  # bitsandbytes not installed: say so in the table, keep the rest
                    rows.append(f"{name:<24} skipped: {err.message}")
                    continue
                bytes_before = report.bytes_per_parameter_before
            counts, hooks = self._count_outliers(converted) if name == "int8" else ({}, [])
            logits, loss = fp32 if variant is None and fp32 is not None else logits_and_loss(converted, batches)
            for hook in hooks:
                hook.remove()
            if counts:
                outlier_note, int8_model = self._summarise_outliers(counts, prefix, results), converted
            errors = relative_errors(logits, reference)  # [N·T]
            agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
            all_logits[name] = logits
            key = f"{prefix}{name}/"
            results.update({key + "val_loss": loss, key + "val_loss_increase": loss - reference_loss,
                            key + "mean_rel_logit_error": float(errors.mean()),
                            key + "max_rel_logit_error": float(errors.max()), key + "top1_agreement": agreement})
            row = (f"{name:<24} {loss:>8.4f} {loss - reference_loss:>+9.4f} {float(errors.mean()):>9.2e} "
                   f"{float(errors.max()):>9.2e} {agreement:>8.2%}")
            if report is not None:
                results[key + "bytes_per_param"] = report.bytes_per_parameter_after
                results[f"{prefix}converted_layers"] = len(report.converted)
                results[f"{prefix}converted_parameters"] = report.parameters
                row += f" {report.bytes_per_parameter_after:>7.3f}"
            rows.append(row)
        if bytes_before is not None:
            results[f"{prefix}fp32/bytes_per_param"] = bytes_before
            rows[0] += f" {bytes_before:>7.3f}"
        if "int8" in all_logits and "bitsandbytes" in all_logits:
            difference = all_logits["int8"] - all_logits["bitsandbytes"]  # [N, T, V]
            between = (difference.norm(dim=-1) / reference.norm(dim=-1)).flatten()
            results[f"{prefix}own_vs_bitsandbytes/mean_rel_logit_diff"] = float(between.mean())
            results[f"{prefix}own_vs_bitsandbytes/max_rel_logit_diff"] = float(between.max())
            rows.append(f"own int8 vs bitsandbytes: ‖z_own − z_bnb‖ / ‖z_fp32‖ per token, mean "
                        f"{float(between.mean()):.2e}, max {float(between.max()):.2e}")
        return "\n".join(rows), outlier_note, int8_model

    def _count_outliers(self, model: nn.Module) -> tuple[dict[str, list[tuple[int, int, float]]], list]:
        """Hook every Int8Linear: per call, (|O|, in_features, max |x|) of the input it saw."""
        counts: dict[str, list[tuple[int, int, float]]] = {}
        hooks = []
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear):
                calls = counts.setdefault(name, [])
                hooks.append(module.register_forward_pre_hook(
                    lambda m, args, calls=calls: calls.append(
                        (int(outlier_dims(args[0], m.threshold).sum()), args[0].shape[-1],
                         float(args[0].abs().max())))))
        return counts, hooks

    def _summarise_outliers(self, counts: dict[str, list[tuple[int, int, float]]], prefix: str,
                            results: dict) -> str:
        """Per layer: mean |O| per matmul, the largest input magnitude; overall share of 16-bit dimensions."""
        lines = [f"outlier feature dimensions (some |x| >= {self.threshold:g}) per int8 matmul, by layer:"]
        sixteen_bit, total = 0, 0
        for name, calls in counts.items():
            mean_o = sum(c[0] for c in calls) / len(calls)
            sixteen_bit += sum(c[0] for c in calls)
            total += sum(c[1] for c in calls)
            largest = max(c[2] for c in calls)
            lines.append(f"  {name:<28} {mean_o:>6.1f} of {calls[0][1]:>4} dims   max |x| {largest:6.2f}")
        share = sixteen_bit / max(total, 1)
        results[f"{prefix}int8/outlier_dim_share"] = share
        lines.append(f"share of feature dimensions computed in 16-bit precision: {share:.3%} "
                     f"(so {1 - share:.3%} of the inner products' terms went through int8)")
        return "\n".join(lines)
