"""What a run needs against what its strategy can do, checked by `papertrain validate` before any work.

A recipe's needs follow from its config and the classes it names, read without building anything:

    the task defines train_step(ctx, batch)          -> custom_step
    `optimizers:` (several, each over a part)          -> named_optimizers
    neither `optimizer:` nor `optimizers:` (a solver)  -> no_optimizer
    a `finetune:` other than all, `quant:`, or a model that freezes_parameters  -> frozen_parameters
    a component declares `requires_capabilities`, or a classmethod `required_capabilities(arguments, tree)`
    (Sophia's optimizer: repeated_backward, for its curvature pass)

and each strategy declares `capabilities` (papertrain/strategies/base.py). Besides, a pipeline needs a
model that says how it splits into stages, a model that freezes part of itself cannot be built with
`strategy.meta_init`, and a step of the task's own runs one micro-batch per step unless the task says
it accumulates. Every mismatch is one ConfigIssue naming the key and the fix.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator

from papertrain.config.components import COMPONENT_KEY, ComponentPolicy, locate
from papertrain.config.yamlfile import Origins, origin_of
from papertrain.errors import ConfigIssue

CUSTOM_STEP, NAMED_OPTIMIZERS, NO_OPTIMIZER = "custom_step", "named_optimizers", "no_optimizer"
FROZEN_PARAMETERS = "frozen_parameters"


def _components(tree: Any, key: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(tree, dict):
        if COMPONENT_KEY in tree:
            yield key, tree
        for name, value in tree.items():
            yield from _components(value, f"{key}.{name}" if key else str(name))


def run_issues(tree: dict[str, Any], policy: ComponentPolicy, origins: Origins, default_where: str
               ) -> list[ConfigIssue]:
    """Every mismatch between what this validated config needs and what its strategy can do."""
    from papertrain.strategies import strategy_class, strategy_table

    issues: list[ConfigIssue] = []

    def report(key: str, message: str) -> None:
        issues.append(ConfigIssue(origin_of(key, origins) or default_where, key, message))

    strategy_name = (tree.get("strategy") or {}).get("name", "single")
    if strategy_name not in strategy_table():
        return issues  # the schema reports it
    strategy = strategy_class(strategy_name)
    task = locate(tree["task"][COMPONENT_KEY], policy)
    model = locate(tree["model"][COMPONENT_KEY], policy)
    custom_step = callable(getattr(task, "train_step", None))

    # -- optimizers ------------------------------------------------------------------------------------
    single, named = tree.get("optimizer"), tree.get("optimizers")
    if single is not None and named:
        report("optimizers", "both `optimizer:` and `optimizers:` are set; a run has one or the other")
    if not named and tree.get("schedulers"):
        report("schedulers", "`schedulers:` is per named optimizer; with one `optimizer:` use `scheduler:`")
    if named and tree.get("scheduler") is not None:
        report("scheduler", f"with named optimizers, give each its schedule under schedulers.NAME "
                            f"(one of {', '.join(named)})")
    for name in (tree.get("schedulers") or {}):
        if name not in (named or {}):
            report(f"schedulers.{name}", f"there is no optimizer '{name}' to schedule (optimizers: "
                                         f"{', '.join(named or {}) or 'none'})")
    if single is None and not named and not getattr(task, "solver", False):
        report("optimizer", f"required: {tree['task'][COMPONENT_KEY]} trains by gradient (only a solver, whose task "
                            "says solver = True, runs without one)")
    if tree.get("data") is None and not custom_step:
        report("data", f"required: {tree['task'][COMPONENT_KEY]} has no train_step of its own to run without data")

    # -- what the strategy can do ----------------------------------------------------------------------
    needs: dict[str, str] = {}
    if custom_step:
        needs[CUSTOM_STEP] = "task"
    if named:
        needs[NAMED_OPTIMIZERS] = "optimizers"
    if single is None and not named:
        needs[NO_OPTIMIZER] = "optimizer"
    finetune = (tree.get("finetune") or {}).get("train", "all")
    if finetune != "all":
        needs[FROZEN_PARAMETERS] = "finetune"
    elif tree.get("quant") is not None:
        needs[FROZEN_PARAMETERS] = "quant"
    elif getattr(model, "freezes_parameters", False):
        needs[FROZEN_PARAMETERS] = "model"
    for key, section in _components(tree):
        try:
            target = locate(section[COMPONENT_KEY], policy)
        except Exception:
            continue  # reported by the schema
        for need in getattr(target, "requires_capabilities", ()) or ():
            needs.setdefault(need, key)
        required = getattr(target, "required_capabilities", None)
        if callable(required):
            arguments = _arguments(target, section)
            for need in required(arguments, tree) or ():
                needs.setdefault(need, key)
    from papertrain.strategies.base import CAPABILITIES

    for need, key in needs.items():
        if need not in strategy.capabilities:
            able = [n for n in strategy_table() if need in strategy_class(n).capabilities]
            report("strategy.name", f"{CAPABILITIES.get(need, need)} (from `{key}`) cannot run under "
                                    f"strategy={strategy_name}{_why(strategy)}; strategies that can: {', '.join(able)}")

    requirement = getattr(strategy, "requires", None)
    if requirement and not callable(getattr(model, requirement, None)):
        report("strategy.name", f"strategy={strategy_name} needs a model with {requirement}() (how it splits into "
                                f"stages), and {tree['model'][COMPONENT_KEY]} has none; use another strategy")

    # -- a frozen base cannot be built shard by shard ------------------------------------------------
    if (tree.get("strategy") or {}).get("meta_init") and (finetune != "all" or getattr(model, "freezes_parameters", False)):
        report("strategy.meta_init", "a model with a frozen base (a LoRA or biases-only finetune) is rebuilt from its "
                                     "weights or the seed on every resume, which a model initialised shard by shard "
                                     "cannot be; drop strategy.meta_init (FSDP2 and ZeRO-3 still shard it once built)")

    # -- a task's own step takes one micro-batch ---------------------------------------------------------
    accumulation = (tree.get("trainer") or {}).get("grad_accum_steps", 1)
    if custom_step and accumulation != 1 and not getattr(task, "accumulates", False):
        report("trainer.grad_accum_steps", f"{tree['task'][COMPONENT_KEY]} runs its own train_step over the whole "
                                           "batch of each rank; set trainer.grad_accum_steps=1")
    return issues


def _why(strategy: type) -> str:
    limits = getattr(strategy, "limits", "")
    return f" ({limits})" if limits else ""


def _arguments(target: Any, section: dict[str, Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {k: v for k, v in section.items() if k != COMPONENT_KEY}
    return {name: section.get(name, p.default) for name, p in parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
