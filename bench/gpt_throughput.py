"""Training throughput: papertrain's engine vs a plain PyTorch loop over Hugging Face's GPT2LMHeadModel.

Both train the same shape (the tiny GPT recipe: 4 layers, d_model 128, 4 heads, context 128, vocabulary
65, batch 32) on the same tiny-Shakespeare windows with AdamW and gradient clipping. They alternate in
one process, round after round, so that machine noise hits both alike; the ratio of the medians is the
figure to quote.

    python bench/gpt_throughput.py                 # 9 rounds of 20 steps each
    python bench/gpt_throughput.py --rounds 9 --steps 30 --device cuda

What the engine's step does beyond the plain loop: sampler indexing, the batch gather, a finite-loss
check, the LR schedule and the strategy's hooks. What HF's model does beyond ours: Conv1D projections,
its attention dispatch, and its general-purpose forward (caches, masks, outputs). The engine wins where
its step is leaner.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from papertrain.config import load_config
from papertrain.recipes.transformers.gpt.hf import hf_config
from papertrain.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "transformers" / "gpt" / "tiny.yaml"


def engine_runner(device: str, run_dir: Path):
    config = load_config(RECIPE, ["trainer.progress=none", "trainer.tensorboard=false", f"trainer.device={device}"])
    trainer = Trainer(config, run_dir)
    trainer.setup()
    tokens_per_step = config.run.trainer.batch_size * config.run.data["block_size"]

    def run(steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss, *_ = trainer.train_step()
        float(loss.detach())  # wait for the last step's work
        return steps * tokens_per_step / (time.perf_counter() - start)

    return run, trainer


def plain_hf_runner(trainer: Trainer, device: str):
    """A hand-written loop: sample windows, forward, cross-entropy, backward, clip, AdamW step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = {k: v for k, v in hf_config(trainer.raw_model).items() if k not in ("model_type", "architectures")}
    model = GPT2LMHeadModel(GPT2Config(**settings)).to(device)
    model.config._attn_implementation = "sdpa"  # HF's fastest CPU/GPU attention path
    model.train()
    optim = trainer.cfg.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]),
                                  weight_decay=optim["weight_decay"])
    data = trainer.data.train
    batch_size, block = trainer.tc.batch_size, trainer.data.block_size
    generator = torch.Generator().manual_seed(0)

    def run(steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            batch = data.batch(torch.randint(0, len(data), (batch_size,), generator=generator))
            inputs, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        return steps * batch_size * block / (time.perf_counter() - start)

    return run, sum(p.numel() for p in model.parameters())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round and contender")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as scratch:
        engine, trainer = engine_runner(args.device, Path(scratch) / "run")
        plain, hf_params = plain_hf_runner(trainer, args.device)
        ours_params = sum(p.numel() for p in trainer.raw_model.parameters())
        print(f"shape: {ours_params:,} parameters (engine) vs {hf_params:,} (HF), batch {trainer.tc.batch_size} x "
              f"{trainer.data.block_size} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"device {args.device}")
        engine(args.warmup)
        plain(args.warmup)
        engine_rates, plain_rates = [], []
        for r in range(args.rounds):
            engine_rates.append(engine(args.steps))
            plain_rates.append(plain(args.steps))
            print(f"round {r + 1}: engine {engine_rates[-1]:>9,.0f} tokens/s   plain HF loop {plain_rates[-1]:>9,.0f} "
                  f"tokens/s   ratio {engine_rates[-1] / plain_rates[-1]:.3f}", flush=True)
    ours, theirs = statistics.median(engine_rates), statistics.median(plain_rates)
    print(f"median: engine {ours:,.0f} tokens/s, plain HF loop {theirs:,.0f} tokens/s, ratio {ours / theirs:.3f}x "
          f"(target >= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
