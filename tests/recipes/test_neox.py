"""GPT-NeoX: the same logits as Hugging Face's GPTNeoXForCausalLM from the same sharded safetensors, cached
decoding equal to recomputation, NeoX's tokenizer, tensor-by-tensor loading, and finetunes of a frozen
base (biases, int8) that checkpoint only what they train and resume exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import RECIPES
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.recipes.lm.sampling.model import Sampler, generate, stream
from papertrain.recipes.transformers.neox.hf import from_pretrained
from papertrain.recipes.transformers.neox.model import GPTNeoX, parameter_count
from papertrain.trainer import Trainer

NEOX = RECIPES / "transformers" / "neox"


def hf_checkpoint(folder: Path, seed: int = 0, shard: str = "60KB", **config) -> Path:
    """A random GPTNeoXForCausalLM saved as HF does it (sharded safetensors + index + config.json)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=176,
                    max_position_embeddings=128, rotary_pct=0.25, hidden_act="gelu_fast", use_parallel_residual=True,
                    tie_word_embeddings=False)
    settings.update(config)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**settings)).eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: randomise them so that they are tested
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.normal_(1.0 if "layernorm" in name or "layer_norm" in name else 0.0, 0.1)
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.mark.parametrize("parallel,rotary_pct,act", [(True, 0.25, "gelu_fast"), (False, 1.0, "gelu"),
                                                     (True, 0.5, "gelu")])
def test_logits_match_transformers_from_the_same_sharded_safetensors(tmp_path: Path, parallel: bool,
                                                                     rotary_pct: float, act: str) -> None:
    from transformers import GPTNeoXForCausalLM

    folder = hf_checkpoint(tmp_path / "hf", use_parallel_residual=parallel, rotary_pct=rotary_pct, hidden_act=act)
    assert (folder / "model.safetensors.index.json").is_file()  # really sharded
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    reference = GPTNeoXForCausalLM.from_pretrained(folder).eval()
    ours = from_pretrained(str(folder)).eval()
    ids = torch.randint(0, 97, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_rotary_turns_only_the_first_quarter_of_each_head_and_depends_on_relative_position() -> None:
    from papertrain.recipes.transformers.neox.model import PartialRotary

    rotary = PartialRotary(head_dim=32, rotary_pct=0.25)
    q, k = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    at = lambda x, m: rotary(x, torch.tensor([m]))  # noqa: E731
    assert torch.equal(at(q, 7)[..., 8:], q[..., 8:])  # 75% of the dimensions carry no position
    scores = [(at(q, m) * at(k, m + 5)).sum().item() for m in (0, 3, 40)]  # ⟨R_m q, R_{m+5} k⟩
    assert max(scores) - min(scores) < 1e-4


def test_cached_decoding_equals_recomputing_the_whole_window() -> None:
    torch.manual_seed(0)
    model = GPTNeoX(vocab_size=50, d_model=64, n_layers=3, n_heads=4, block_size=64).eval()
    prompt = torch.randint(0, 50, (1, 9))
    greedy = Sampler(temperature=0.0)
    uncached = generate(model, prompt, 30, greedy)[0, 9:].tolist()
    cached = list(stream(model, prompt, 30, greedy))
    assert cached == uncached
    # and every cached step's logits equal the full forward pass at that position
    ids = torch.cat([prompt, torch.tensor([uncached])], dim=1)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        steps = [model(ids[:, :9], cache)] + [model(ids[:, t:t + 1], cache) for t in range(9, ids.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_sampled_streams_are_reproducible_and_stop_at_the_stop_token() -> None:
    torch.manual_seed(0)
    model = GPTNeoX(vocab_size=20, d_model=32, n_layers=2, n_heads=2, block_size=64).eval()
    prompt = torch.tensor([[1, 2, 3]])
    draw = lambda: list(stream(model, prompt, 40, Sampler(1.0), torch.Generator().manual_seed(5)))  # noqa: E731
    tokens = draw()
    assert tokens == draw() and len(tokens) == 40
    stop = tokens[10]
    stopped = list(stream(model, prompt, 40, Sampler(1.0), torch.Generator().manual_seed(5), stop_ids=[stop]))
    assert stopped == tokens[:tokens.index(stop)]


def test_neox_tokenizer_encodes_hello_world_to_the_reference_ids() -> None:
    from papertrain.data.tokenizers import neox_tokenizer

    tokenizer = neox_tokenizer()
    assert tokenizer.encode("Hello world") == [12092, 1533]  # GPT-NeoX-20B's ids ("Hello", " world")
    assert tokenizer.encode("Hello, I am") == [12092, 13, 309, 717]
    assert tokenizer.decode([12092, 1533]) == "Hello world"
    assert tokenizer.eot_id == 0


def test_neox_tokenizer_matches_hugging_face_tokenizers_on_prose_code_and_unicode() -> None:
    import inspect
    import json as json_module

    from tokenizers import Tokenizer

    from papertrain.data.sources import resolve
    from papertrain.data.tokenizers import neox_tokenizer

    ours = neox_tokenizer()
    reference = Tokenizer.from_file(str(resolve("neox_tokenizer")["tokenizer.json"]))
    shakespeare = resolve("tiny_shakespeare")["input.txt"].read_text()[:60_000]
    code = inspect.getsource(json_module.decoder)  # indentation: NeoX's added whitespace tokens
    unicode = "Cafe\u0301 naïve — 日本語 🙂 <|endoftext|> a<|padding|>b  \t\n\n    end"
    for text in (shakespeare, code, unicode):
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)


def test_parameter_count_formula_matches_the_module() -> None:
    with torch.device("meta"):
        model = GPTNeoX(vocab_size=1000, d_model=96, n_layers=3, n_heads=4, d_ff=200)
    assert parameter_count(1000, 96, 3, 200) == sum(p.numel() for p in model.parameters())
    # and the real 20B shape (Black et al. 2022, Table 1): 20.55B parameters
    assert round(parameter_count(50432, 6144, 44) / 1e9, 2) == 20.55


def test_20b_config_describes_the_paper_model_and_fits_one_48gb_gpu_for_generation() -> None:
    from papertrain.plan import GIB, fits, generation_estimates, model_facts

    config = load_config(NEOX / "20b.yaml", ["pretrained.path=/nonexistent"])
    facts = model_facts(config)
    assert round(facts.parameters / 1e9, 2) == 20.55
    fp16, int8 = generation_estimates(facts)
    assert fits(fp16.total, 48 * GIB) and not fits(fp16.total, 40 * GIB)
    assert fits(int8.total, 24 * GIB)


@pytest.mark.slow
def test_loading_holds_one_tensor_at_a_time_not_a_second_copy(tmp_path: Path) -> None:
    """A 200 MB checkpoint: the process grows by the model (loaded in place), not by model + a copy."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shape = GPTNeoX(vocab_size=8192, d_model=512, n_layers=14, n_heads=8)
    weights = {f"gpt_neox.{n}" if not n.startswith("embed_out") else n: torch.randn(p.shape)
               for n, p in shape.named_parameters()}
    model_bytes = sum(t.numel() * 4 for t in weights.values())
    save_file(weights, tmp_path / "model.safetensors")
    del weights
    script = f"""
import resource, torch
from papertrain.recipes.transformers.neox.model import GPTNeoX
from papertrain.pretrained import load_weights
from pathlib import Path
with torch.device("meta"):
    model = GPTNeoX(vocab_size=8192, d_model=512, n_layers=14, n_heads=8)
torch.zeros(1) + 1  # let torch settle its own allocations first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
load_weights(model, Path({str(tmp_path)!r}), torch.device("cpu"), torch.float32)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before)
"""
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               timeout=300).stdout.split()[-1])
    assert model_bytes > 150e6
    assert grown < 1.25 * model_bytes, f"grew {grown / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"


def finetune(run_dir: Path, folder: Path, *overrides: str):
    config = load_config(NEOX / "tiny.yaml", [
        f"pretrained.path={folder}", "model.vocab_size=97", "model.d_model=64", "model.n_layers=3", "model.d_ff=176",
        "model.n_heads=4", "data.block_size=32", "trainer.batch_size=8", "trainer.log_every=1",
        "trainer.progress=none", "trainer.tensorboard=false", "trainer.plot=false", "trainer.eval_every=0",
        "trainer.sample_every=-1", "trainer.eval_batches=2", *overrides])
    return Trainer(config, run_dir).run()


def losses(run_dir: Path) -> list[float]:
    return [e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


@pytest.mark.parametrize("quant", [[], ["quant=int8"]])
def test_biases_finetune_checkpoints_only_the_biases_and_resumes_exactly(tmp_path: Path, quant: list[str]) -> None:
    from safetensors import safe_open

    folder = hf_checkpoint(tmp_path / "hf")
    common = ["finetune=biases", "trainer.checkpoint_every=3", "scheduler.total_steps=6", *quant]
    finetune(tmp_path / "straight", folder, "trainer.max_steps=6", *common)
    finetune(tmp_path / "resumed", folder, "trainer.max_steps=3", *common)
    finetune(tmp_path / "resumed", folder, "trainer.max_steps=6", *common)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")  # exact
    saved = next((tmp_path / "straight/checkpoints/step_00000006/model").glob("*.safetensors"))
    with safe_open(str(saved), framework="pt") as handle:
        names = list(handle.keys())
        assert names and all(handle.get_tensor(n).dim() == 1 for n in names)  # biases and norm gains only
    base = from_pretrained(str(folder))
    frozen = {n: p for n, p in base.named_parameters() if p.dim() > 1}
    assert not any(n in frozen for n in names)


def test_impossible_combinations_are_refused_before_any_work(tmp_path: Path) -> None:
    folder = hf_checkpoint(tmp_path / "hf")
    cases = {
        ("quant=int8",): "cannot be trained",
        ("quant=int8", "finetune=biases", "strategy=fsdp2", "strategy.world_size=1"): "use strategy=ddp",
        ("pretrained.dtype=fp16", "finetune=biases"): "trainer.precision=fp16",
        ("pretrained.dtype=bf16",): "16-bit weights directly",
        ("finetune=lora",): "needs a finetune.lora section",
        ("strategy=fsdp2", "strategy.world_size=1", "strategy.meta_init=true"): "drop strategy.meta_init",
    }
    for overrides, message in cases.items():
        with pytest.raises(PapertrainError, match=message):
            finetune(tmp_path / "refused", folder, "trainer.max_steps=1", *overrides)
        assert not (tmp_path / "refused").exists()
    with pytest.raises(PapertrainError, match="does not fit the model"):
        finetune(tmp_path / "wrong", folder, "trainer.max_steps=1", "model.n_layers=2")
    with pytest.raises(PapertrainError, match="not found"):
        finetune(tmp_path / "wrong", tmp_path / "nowhere", "trainer.max_steps=1")


def test_generate_streams_from_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from papertrain.cli import main

    folder = hf_checkpoint(tmp_path / "hf")
    finetune(tmp_path / "run", folder, "trainer.max_steps=2", "finetune=biases")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ROMEO:") and len(captured.out) == len("ROMEO:") + 12 + 1
    assert "12 tokens" in captured.err and "step 2" in captured.err
    assert main(["generate", "neox", "--prompt", "x"]) == 2
    assert "random initialisation" in capsys.readouterr().err


LORA = ["finetune=lora", "finetune.lora.targets=[query_key_value, dense]", "finetune.lora.r=4"]


def finetune_rank(run_dir: str, folder: str, overrides: list[str]) -> None:
    finetune(Path(run_dir), Path(folder), *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=ddp", "quant=int8"], ["strategy=fsdp2"],
                                      ["strategy=deepspeed", "strategy.stage=3"],
                                      ["strategy=pipeline", "quant=int8", "trainer.grad_accum_steps=2"],
                                      ["strategy=ddp", "quant=int8", *LORA],
                                      ["strategy=pipeline", "quant=int8", "trainer.grad_accum_steps=2",
                                       "strategy.activation_checkpointing=true", *LORA]],
                         ids=["ddp-int8", "fsdp2", "zero3", "pipeline-int8", "ddp-int8-lora", "pipeline-int8-lora"])
def test_a_frozen_base_finetune_on_two_ranks_matches_one_process(tmp_path: Path, strategy: list[str]) -> None:
    from multiprocess import run_ranks

    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    folder = hf_checkpoint(tmp_path / "hf")
    common = ["trainer.max_steps=3", *[s for s in strategy if s.startswith(("quant", "finetune"))]]
    if not any(s.startswith("finetune") for s in common):
        common.append("finetune=biases")
    finetune(tmp_path / "one", folder, *common)
    run_ranks(2, finetune_rank, str(tmp_path / "two"), str(folder), [*common, *strategy])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 3 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)


def test_stages_are_balanced_by_parameters_with_the_embedding_first_and_the_head_last() -> None:
    from papertrain.strategies.pipeline import balanced_split

    assert balanced_split([10] * 4, 0, 0, 2) == [0, 0, 1, 1]
    assert balanced_split([10] * 4, 20, 0, 2) == [0, 1, 1, 1]  # the embedding weighs on stage 0
    assert balanced_split([10] * 6, 0, 0, 3) == [0, 0, 1, 1, 2, 2]
    assert balanced_split([5, 5, 30, 5, 5], 0, 0, 2) in ([0, 0, 0, 1, 1], [0, 0, 1, 1, 1])
    # NeoX-20B on two GPUs: 44 equal layers, equal embedding and head -> 22 + 22
    assert balanced_split([453] * 44, 309, 309, 2).count(0) == 22
    with pytest.raises(PapertrainError, match="at least 3 blocks"):
        balanced_split([1, 1], 0, 0, 3)


def pipeline_rank(run_dir: str, overrides: list[str]) -> None:
    config = load_config(NEOX / "tiny.yaml", [*TINY_TRAINING, *overrides])
    Trainer(config, Path(run_dir)).run()


TINY_TRAINING = ["model.d_model=32", "model.n_layers=4", "model.n_heads=2", "data.block_size=32",
                 "trainer.batch_size=8", "trainer.log_every=1", "trainer.progress=none", "trainer.tensorboard=false",
                 "trainer.plot=false", "trainer.eval_every=0", "trainer.sample_every=0", "trainer.eval_batches=2",
                 "trainer.checkpoint_every=0", "task.sample_tokens=8", "trainer.max_steps=3"]


@pytest.mark.slow
def test_a_two_stage_pipeline_with_micro_batches_matches_one_process(tmp_path: Path) -> None:
    """GPipe over 2 gloo ranks, 4 micro-batches: the same losses, evaluation and samples as one process."""
    from multiprocess import run_ranks

    pipeline_rank(str(tmp_path / "one"), [])
    run_ranks(2, pipeline_rank, str(tmp_path / "two"), ["strategy=pipeline", "trainer.grad_accum_steps=4"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 3 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    val = [[e["val/loss"] for e in read_metrics(run / "metrics.jsonl") if "val/loss" in e]
           for run in (tmp_path / "one", tmp_path / "two")]
    assert val[1] and abs(val[0][-1] - val[1][-1]) <= 1e-5
    samples = [(run / "samples" / "step_00000003.txt").read_text() for run in (tmp_path / "one", tmp_path / "two")]
    assert samples[0] == samples[1]


@pytest.mark.slow
def test_a_pipeline_finetune_resumes_exactly(tmp_path: Path) -> None:
    from multiprocess import run_ranks

    folder = hf_checkpoint(tmp_path / "hf")
    common = ["strategy=pipeline", "finetune=biases", "trainer.grad_accum_steps=2", "trainer.checkpoint_every=2",
              "scheduler.total_steps=4"]
    run_ranks(2, finetune_rank, str(tmp_path / "straight"), str(folder), [*common, "trainer.max_steps=4"])
    run_ranks(2, finetune_rank, str(tmp_path / "resumed"), str(folder), [*common, "trainer.max_steps=2"])
    run_ranks(2, finetune_rank, str(tmp_path / "resumed"), str(folder), [*common, "trainer.max_steps=4"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert len(losses(tmp_path / "resumed")) == 4


@pytest.mark.parametrize("backend", ["own", "bitsandbytes"])
def test_generate_from_pretrained_weights_in_int8_follows_the_fp32_model(tmp_path: Path, backend: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`papertrain generate neox pretrained.path=... quant=int8`: every layer becomes int8 as it loads, and
    greedy decoding of a random model (a hard case: nearly flat logits) mostly keeps the fp32 tokens."""
    from papertrain.cli import main

    folder = hf_checkpoint(tmp_path / "hf")
    shape = [f"pretrained.path={folder}", "model.vocab_size=97", "model.d_model=64", "model.n_layers=3",
             "model.d_ff=176", "model.n_heads=4"]
    texts = []
    for quant in ([], ["quant=int8", f"quant.backend={backend}"]):
        assert main(["generate", "neox", *shape, *quant, "--prompt", "ROMEO:", "--max-new-tokens", "20",
                     "--temperature", "0"]) == 0
        out = capsys.readouterr().out
        texts.append(out[out.index("ROMEO:"):])  # (an import may have logged a line before it)
    same = sum(a == b for a, b in zip(*texts))
    assert texts[0].startswith("ROMEO:") and same >= len(texts[0]) * 0.6, texts
