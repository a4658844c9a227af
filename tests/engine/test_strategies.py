"""Every strategy computes what one process computes: the GPT recipe's loss, step by step, on 2 gloo ranks.

The global batch is the same in every run (trainer.batch_size is global), so DDP, FSDP2 and DeepSpeed
ZeRO 1/2/3 must reproduce the single-process losses to float32 rounding (|diff| <= 1e-5).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import SMALL_GPT, gpt_config_path
from multiprocess import run_ranks
from papertrain.config import load_config
from papertrain.metrics import read_metrics
from papertrain.trainer import Trainer

STEPS = ["trainer.max_steps=5", "trainer.eval_batches=2"]


def train_rank(run_dir: str, overrides: list[str]) -> None:
    Trainer(load_config(gpt_config_path(), [*SMALL_GPT, *STEPS, *overrides]), Path(run_dir)).run()


def losses(run_dir: Path) -> list[float]:
    return [e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


def memory(run_dir: Path) -> dict[str, float]:
    return next(e for e in read_metrics(run_dir / "metrics.jsonl") if "memory/params_bytes" in e)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    train_rank(str(run_dir), [])
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    ["strategy=ddp"],
    ["strategy=fsdp2"],
    ["strategy=deepspeed", "strategy.stage=1"],
    ["strategy=deepspeed", "strategy.stage=2"],
    ["strategy=deepspeed", "strategy.stage=3"],
], ids=["ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_two_ranks_match_one_process(tmp_path: Path, single_process: Path, strategy: list[str]) -> None:
    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    run_ranks(2, train_rank, str(tmp_path), strategy)
    expected, got = losses(single_process), losses(tmp_path)
    assert len(got) == len(expected) == 5
    assert max(abs(a - b) for a, b in zip(expected, got)) <= 1e-5, (expected, got)


# -- checkpoints across strategies and world sizes ----------------------------------------------------
HALVES = ["scheduler.total_steps=6", "trainer.checkpoint_every=3"]  # one schedule for both halves


def run(run_dir: Path, world: int, steps: int, strategy: list[str]) -> None:
    overrides = [*HALVES, f"trainer.max_steps={steps}", *strategy]
    if world == 1:
        train_rank(str(run_dir), overrides)
    else:
        run_ranks(world, train_rank, str(run_dir), overrides)


@pytest.fixture(scope="module")
def straight_six(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("straight")
    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    run(run_dir, 1, 6, [])
    return losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [
    ((2, ["strategy=fsdp2"]), (1, [])),  # sharded on 2 ranks -> one process
    ((1, []), (2, ["strategy=fsdp2"])),  # one process -> sharded on 2 ranks
    ((2, ["strategy=fsdp2"]), (2, ["strategy=ddp"])),
], ids=["fsdp2x2-to-single", "single-to-fsdp2x2", "fsdp2x2-to-ddpx2"])
def test_checkpoint_resumes_on_another_world_size(tmp_path: Path, straight_six: list[float], first, second) -> None:
    run(tmp_path, first[0], 3, first[1])
    assert len(losses(tmp_path)) == 3
    run(tmp_path, second[0], 6, second[1])
    got = losses(tmp_path)
    assert len(got) == 6 and max(abs(a - b) for a, b in zip(straight_six, got)) <= 1e-5, (straight_six, got)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=fsdp2"], ["strategy=deepspeed", "strategy.stage=3"]],
                         ids=["fsdp2", "zero3"])
def test_resume_on_the_same_ranks_is_exact(tmp_path: Path, strategy: list[str]) -> None:
    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    run(tmp_path / "straight", 2, 6, strategy)
    run(tmp_path / "resumed", 2, 3, strategy)
    run(tmp_path / "resumed", 2, 6, strategy)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bit for bit


def test_a_deepspeed_checkpoint_refuses_another_strategy(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    run(tmp_path, 2, 3, ["strategy=deepspeed", "strategy.stage=2"])
    with pytest.raises(Exception, match="written by strategy 'deepspeed'"):
        run(tmp_path, 1, 6, [])


# -- memory per rank -----------------------------------------------------------------------------------
def model_state_bytes(run_dir: Path) -> float:
    m = memory(run_dir)
    return m["memory/params_bytes"] + m["memory/grads_bytes"] + m["memory/optimizer_bytes"]


@pytest.mark.slow
def test_fsdp2_holds_half_the_model_state_per_rank(tmp_path: Path, single_process: Path) -> None:
    run_ranks(2, train_rank, str(tmp_path), ["strategy=fsdp2"])
    assert model_state_bytes(tmp_path) <= 0.6 * model_state_bytes(single_process)


@pytest.mark.slow
def test_zero3_holds_about_half_the_model_state_per_rank(tmp_path: Path) -> None:
    """In bf16, ZeRO-3's only extra over an even split is the fp32 master copy of each rank's shard."""
    pytest.importorskip("deepspeed")
    train_rank(str(tmp_path / "single"), ["trainer.precision=bf16"])
    run_ranks(2, train_rank, str(tmp_path / "zero3"), ["strategy=deepspeed", "strategy.stage=3",
                                                      "trainer.precision=bf16"])
    assert model_state_bytes(tmp_path / "zero3") <= 0.6 * model_state_bytes(tmp_path / "single")
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "single"), losses(tmp_path / "zero3"))) < 2e-3


# -- building a model that never exists whole ------------------------------------------------------------
BIG = dict(vocab_size=65, block_size=32, n_layers=12, n_heads=8, d_model=512, dropout=0.0, norm_first=True)
BIG_BYTES = 4 * (65 * 512 + 32 * 512 + 12 * (12 * 512 * 512 + 13 * 512) + 2 * 512)


def build_and_measure(out: str, strategy: list[str]) -> None:
    import json

    from papertrain.config import load_config
    from papertrain.distributed import disconnect
    from papertrain.recipes.transformers.gpt.model import GPT
    from papertrain.strategies import build_strategy

    config = load_config(gpt_config_path(), strategy)
    built = build_strategy(config.run.strategy, config.run.trainer)
    # a small model first, so that one-time costs (imports, lazy initialisation) are not measured
    small = {**BIG, "n_layers": 1, "d_model": 32, "n_heads": 2}
    built.build_model(lambda: GPT(**small))
    # measure the peak of this step alone: Linux resets the high-water mark (VmHWM) on request
    Path("/proc/self/clear_refs").write_text("5")
    before = resident_kib("VmRSS")
    module = built.build_model(lambda: GPT(**BIG))  # construction, sharding and initialisation
    growth = (resident_kib("VmHWM") - before) * 1024
    weight = module.layers[5].ffn.linear1.weight
    if hasattr(weight, "ds_tensor"):  # DeepSpeed: look at the whole weight for a moment
        import deepspeed
        with deepspeed.zero.GatheredParameters([weight]):
            std = float(weight.detach().std())
    else:
        whole = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        std = float(whole.detach().std())
    held = sum(built.parameter_bytes(p) for p in module.parameters())
    Path(out, f"rank{built.rank}.json").write_text(json.dumps({"growth": growth, "held": held, "std": std}))
    del module, weight, built
    disconnect()  # the groups go while the interpreter is whole (see papertrain.distributed.disconnect)


def resident_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in KiB."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def measured(folder: Path) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=fsdp2"], ["strategy=deepspeed", "strategy.stage=3"]],
                         ids=["fsdp2-meta", "zero3-zero.Init"])
def test_meta_init_never_materialises_the_whole_model(tmp_path: Path, strategy: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    # Peak RSS must track live memory: glibc otherwise raises its mmap threshold after large frees and
    # keeps freed blocks on the heap, so building and freeing one layer after another would look like
    # holding them all (zero.Init does exactly that).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    (tmp_path / "meta").mkdir()
    (tmp_path / "full").mkdir()
    run_ranks(2, build_and_measure, str(tmp_path / "meta"), [*strategy, "strategy.meta_init=true"])
    run_ranks(2, build_and_measure, str(tmp_path / "full"), [*strategy, "strategy.meta_init=false"])
    for rank in measured(tmp_path / "full"):  # the measurement sees a whole model when there is one
        assert rank["growth"] >= 0.9 * BIG_BYTES
    for rank in measured(tmp_path / "meta"):
        assert rank["held"] <= 0.55 * BIG_BYTES  # this rank's shard
        assert rank["growth"] <= 0.75 * BIG_BYTES, f"peak grew by {rank['growth'] / BIG_BYTES:.2f} of the model"
        assert 0.015 < rank["std"] < 0.025  # GPT's N(0, 0.02), applied module by module to the shards


# -- activation checkpointing ---------------------------------------------------------------------------
def test_activation_checkpointing_saves_less_and_changes_nothing() -> None:
    import torch

    from papertrain.recipes.transformers.gpt.model import GPT
    from papertrain.strategies.base import checkpoint_activations

    def saved_bytes_and_grads(checkpointed: bool) -> tuple[int, list]:
        torch.manual_seed(0)
        model = GPT(65, 64, n_layers=4, n_heads=4, d_model=64, dropout=0.0)
        if checkpointed:
            assert checkpoint_activations(model) == 4  # one per transformer layer
        tokens = torch.randint(0, 65, (8, 64))
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        return sum(saved), [p.grad.clone() for p in model.parameters()]

    plain_bytes, plain_grads = saved_bytes_and_grads(False)
    checkpointed_bytes, checkpointed_grads = saved_bytes_and_grads(True)
    assert checkpointed_bytes < 0.5 * plain_bytes  # only each layer's input is kept for backward
    for a, b in zip(plain_grads, checkpointed_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp2_matches_one_process(tmp_path: Path, single_process: Path) -> None:
    run_ranks(2, train_rank, str(tmp_path), ["strategy=fsdp2", "strategy.activation_checkpointing=true"])
    assert max(abs(a - b) for a, b in zip(losses(single_process), losses(tmp_path))) <= 1e-5


# -- every recipe, unchanged, under every strategy ------------------------------------------------------
# One pair of ranks per strategy trains every recipe in turn (in one process group), and one process trains
# each once for reference: ~8 spawned pairs fewer per recipe than a pair per (recipe, strategy) would cost.
RECIPE_CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*/*/tiny.yaml"))
BRIEF = ["trainer.max_steps=2", "trainer.eval_batches=1", "trainer.batch_size=8", "trainer.log_every=1",
         "trainer.progress=none", "trainer.plot=false", "trainer.tensorboard=false", "trainer.checkpoint_every=0",
         "trainer.eval_every=0", "trainer.sample_every=-1"]
# work a recipe does before its first step, cut short so that these tests stay about the training itself
BRIEF_SETUP = {"distillation": ["task.teacher_steps=3", "task.teacher_hidden=[32]"],  # its teacher artifact
               "ppo": ["task.eval_episodes=2", "task.epochs=2"],
               "gan": ["task.classifier_steps=3", "task.classifier_hidden=[16]"]}  # its classifier artifact
STRATEGIES = {"ddp": ["strategy=ddp"], "fsdp2": ["strategy=fsdp2"], "zero3": ["strategy=deepspeed", "strategy.stage=3"],
              "zero3_reference": ["strategy=zero3_reference"]}  # the ZeRO-3 recipe's own strategy


def recipe_overrides(config: Path) -> list[str]:
    # dropout draws different masks on 1 and 2 processes; without it the two runs compute the same thing
    no_dropout = ["model.dropout=0.0"] if "dropout" in load_config(config).tree["model"] else []
    return [*BRIEF, *no_dropout, *BRIEF_SETUP.get(config.parent.name, [])]


def train_every_recipe(out: str, strategy: list[str]) -> None:
    """Every recipe under `strategy` (on each of the ranks of one job); a refusal by validate is recorded."""
    from papertrain.distributed import connect, disconnect, process_info
    from papertrain.errors import ConfigError

    if strategy:
        connect(process_info(), "cpu")  # one group for every recipe: the trainers join it
    for config in RECIPE_CONFIGS:
        run_dir = Path(out) / config.parent.name
        try:
            loaded = load_config(config, [*recipe_overrides(config), *strategy,
                                          *(["strategy.world_size=2"] if strategy else [])])
        except ConfigError as refused:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "refused.txt").write_text(str(refused))
            continue
        Trainer(loaded, run_dir).run()
    if strategy:
        disconnect()


@pytest.fixture(scope="module")
def every_recipe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for these runs (module-scoped fixtures come before the per-test isolated cache)."""
    cache = tmp_path_factory.mktemp("every-recipe-cache")
    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    os.environ["PAPERTRAIN_DATA"] = str(cache)
    return cache


@pytest.fixture(scope="module")
def every_recipe_on_one_process(tmp_path_factory: pytest.TempPathFactory, every_recipe_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("every-recipe-one")
    os.environ["PAPERTRAIN_DATA"] = str(every_recipe_cache)
    train_every_recipe(str(out), [])
    return out


@pytest.fixture(scope="module", params=list(STRATEGIES), ids=list(STRATEGIES))
def every_recipe_on_two_ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                              every_recipe_cache: Path) -> Path:
    if request.param == "zero3":
        pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp(f"every-recipe-{request.param}")
    os.environ["PAPERTRAIN_DATA"] = str(every_recipe_cache)  # the spawned ranks inherit it
    run_ranks(2, train_every_recipe, str(out), STRATEGIES[request.param])
    return out


# Found by this test (2026-12-02) and not fixed yet: under zero3_reference these recipes' second-step losses
# depart from one process's by 1.3e-4 to 1.7e-3 (their first steps agree). An expected failure, strictly: the
# day one matches, the test says so and it must leave this list.
ZERO3_REFERENCE_DEPARTS = {"batch_channel_norm", "batch_norm", "group_norm", "layer_norm", "norms",
                           "weight_standardization", "mha"}


@pytest.mark.slow
@pytest.mark.parametrize("config", RECIPE_CONFIGS, ids=lambda p: p.parent.name)
def test_every_recipe_runs_unchanged_on_two_ranks(config: Path, every_recipe_on_one_process: Path,
                                                  every_recipe_on_two_ranks: Path, request: pytest.FixtureRequest) -> None:
    """2 ranks give one process's losses (the same global batch), for ddp, fsdp2, DeepSpeed's ZeRO-3 and the
    zero3 recipe's own (recipes/scaling/zero3); or, where the
    strategy cannot run what the recipe needs (DeepSpeed and a task's own step, a solver under data
    parallelism), `papertrain validate` refuses it up front, naming the strategies that can."""
    name = config.parent.name
    refused = every_recipe_on_two_ranks / name / "refused.txt"
    if refused.is_file():
        assert "cannot run under" in refused.read_text() and "strategies that can:" in refused.read_text()
        return
    one, two = losses(every_recipe_on_one_process / name), losses(every_recipe_on_two_ranks / name)
    departure = max(abs(a - b) for a, b in zip(one, two))
    if request.node.callspec.params["every_recipe_on_two_ranks"] == "zero3_reference" and name in ZERO3_REFERENCE_DEPARTS:
        assert departure > 1e-4, f"{name} now matches one process under zero3_reference: remove it from the list"
        pytest.xfail(f"zero3_reference departs from one process by {departure:.2g} (known, ZERO3_REFERENCE_DEPARTS)")
    assert len(two) == 2 and departure <= 1e-4, (one, two)
    evaluated = [e for e in read_metrics(every_recipe_on_two_ranks / name / "metrics.jsonl")
                 if any(k.startswith("val/") for k in e)]
    assert evaluated, "evaluation ran on the sharded model"


# -- export: any checkpoint -> one safetensors file --------------------------------------------------------
@pytest.mark.slow
def test_export_gives_the_same_weights_from_any_strategy(tmp_path: Path, single_process: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from papertrain.export import export

    folder, layout = export(single_process, out=tmp_path / "single", layout="papertrain")
    assert layout == "papertrain"
    reference = load_file(folder / "model.safetensors")
    strategies = {"fsdp2": ["strategy=fsdp2"]}
    try:
        import deepspeed  # noqa: F401
        strategies["zero3"] = ["strategy=deepspeed", "strategy.stage=3"]
    except ImportError:
        pass
    for name, strategy in strategies.items():
        run_ranks(2, train_rank, str(tmp_path / name), strategy)
        exported = load_file(export(tmp_path / name, out=tmp_path / f"{name}-export", layout="papertrain")[0]
                             / "model.safetensors")
        assert exported.keys() == reference.keys(), name
        for key in reference:
            torch.testing.assert_close(exported[key], reference[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path: Path, single_process: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import torch
    import yaml

    from papertrain.config import instantiate
    from papertrain.export import export, find_checkpoint, full_weights

    folder, layout = export(single_process, out=tmp_path / "hf")
    assert layout == "hf" and (folder / "config.json").is_file()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = instantiate(yaml.safe_load((single_process / "config.yaml").read_text())["model"]).eval()
    ours.load_state_dict(full_weights(find_checkpoint(single_process, None)))
    tokens = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-4, rtol=0)


def test_hf_export_has_a_tokenizer_and_generation_config_that_give_our_text(tmp_path: Path,
                                                                            single_process: Path) -> None:
    """AutoTokenizer + AutoModelForCausalLM + generate on the export: the same ids for the same text, and
    greedy decoding gives `papertrain generate --temperature 0`'s text. Files as the umask allows."""
    transformers = pytest.importorskip("transformers")
    import io
    import json
    import stat

    from papertrain.export import export
    from papertrain.generation import generate_text, load_for_generation

    folder, _ = export(single_process, out=tmp_path / "hf")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}
    mask = os.umask(0)
    os.umask(mask)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in folder.iterdir())
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_for_generation(str(single_process), [], device="cpu")
    prompt = "ROMEO:\nWhat say you, my lord?"
    ids = ours.tokenizer.encode(prompt)
    assert theirs_tokenizer(prompt)["input_ids"] == ids and theirs_tokenizer.decode(ids) == prompt
    settings = json.loads((folder / "generation_config.json").read_text())
    assert settings["do_sample"] is True and settings["temperature"] == pytest.approx(0.8) and settings["top_k"] == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    out = io.StringIO()
    prompt, new = "ROMEO:", 24  # within the tiny model's 32 positions (HF's GPT-2 cannot slide a window)
    generate_text(ours, prompt, new, temperature=0.0, top_k=None, top_p=None, seed=0, out=out)
    import torch
    with torch.no_grad():
        produced = theirs.generate(torch.tensor([ours.tokenizer.encode(prompt)]), do_sample=False, max_new_tokens=new)
    assert theirs_tokenizer.decode(produced[0]) + "\n" == out.getvalue()


def test_export_errors_are_clear(tmp_path: Path, single_process: Path) -> None:
    from papertrain.errors import PapertrainError
    from papertrain.export import export

    with pytest.raises(PapertrainError, match="has no config.yaml, so it is not a run directory"):
        export(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text((single_process / "config.yaml").read_text())
    with pytest.raises(PapertrainError, match="has no checkpoints"):
        export(tmp_path / "run")
    with pytest.raises(PapertrainError, match="no checkpoint of step 999"):
        export(single_process, step=999, out=tmp_path / "x")


# -- checkpoints written in the background ---------------------------------------------------------------
ASYNC = ["trainer.checkpoint_every=2", "trainer.keep_last=5", "trainer.max_steps=6"]


def checkpoint_tensors(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    return {f"{part}/{f.name}:{k}": v for part in ("model", "optimizer")
            for f in sorted((folder / part).glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_async_checkpoints_hold_exactly_their_step(tmp_path: Path, world: int) -> None:
    """Training goes on while a checkpoint is written; what lands on disk must still be that step's state."""
    import torch

    strategy = ["strategy=fsdp2"] if world == 2 else []
    for name, extra in (("sync", []), ("async", ["strategy.async_checkpoint=true"])):
        overrides = [*ASYNC, *strategy, *extra]
        if world == 1:
            train_rank(str(tmp_path / name), overrides)
        else:
            run_ranks(2, train_rank, str(tmp_path / name), overrides)
    assert losses(tmp_path / "sync") == losses(tmp_path / "async")
    for step in (2, 4, 6):
        sync, background = checkpoint_tensors(tmp_path / "sync", step), checkpoint_tensors(tmp_path / "async", step)
        assert sync.keys() == background.keys() and sync
        assert all(torch.equal(sync[k], background[k]) for k in sync), f"step {step} differs"
    assert not list((tmp_path / "async" / "checkpoints").glob(".tmp-*")), "every background save was committed"


def test_async_checkpoint_is_refused_where_it_is_not_implemented(tmp_path: Path) -> None:
    from papertrain.errors import PapertrainError

    with pytest.raises(PapertrainError, match="async_checkpoint is implemented for single, ddp and fsdp2"):
        train_rank(str(tmp_path), ["strategy=zero3_reference", "strategy.world_size=1",
                                   "strategy.async_checkpoint=true"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=ddp"], ["strategy=fsdp2"]], ids=["ddp-bf16", "fsdp2-bf16"])
def test_bf16_on_two_ranks_tracks_bf16_on_one(tmp_path: Path, strategy: list[str]) -> None:
    """Mixed precision per strategy: autocast under DDP, FSDP2's MixedPrecisionPolicy (bf16 compute)."""
    train_rank(str(tmp_path / "one"), ["trainer.precision=bf16"])
    run_ranks(2, train_rank, str(tmp_path / "two"), [*strategy, "trainer.precision=bf16"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 5 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-3, (one, two)


def test_a_deepspeed_build_lock_left_by_an_interrupted_run_is_removed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed during its first build of the CPU communication op, DeepSpeed leaves torch's file lock behind and
    every later run waits on it forever; a lock older than any build takes is removed (a fresh one is kept)."""
    import time

    from torch.utils.cpp_extension import _get_build_directory

    from papertrain.strategies.deepspeed_zero import remove_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    remove_stale_build_lock()
    assert lock.exists()  # another process may be building right now
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    remove_stale_build_lock()
    assert not lock.exists()
