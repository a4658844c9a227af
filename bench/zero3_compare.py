"""Three ZeRO-3s side by side: FSDP2, DeepSpeed ZeRO-3 and the reference in recipes/scaling/zero3.

Each round trains the tiny GPT recipe (0.82M parameters, global batch 32 x 128 tokens) for a few steps
on N local ranks with each strategy in turn, so that machine noise falls on all three alike, and reads
back from the run's metrics:

    model state / rank   parameters + gradients + optimizer state held by one rank (bytes)
    step time            median seconds per optimizer step (first steps excluded: warm-up)

    python bench/zero3_compare.py                      # 2 ranks, 3 rounds of 12 steps
    python bench/zero3_compare.py --ranks 2 --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch.multiprocessing as mp

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "transformers" / "gpt" / "tiny.yaml"
STRATEGIES = {
    "fsdp2": ["strategy=fsdp2"],
    "deepspeed zero-3": ["strategy=deepspeed", "strategy.stage=3"],
    "zero3_reference": ["strategy=zero3_reference"],
}
QUIET = ["trainer.progress=none", "trainer.plot=false", "trainer.tensorboard=false", "trainer.log_every=1",
         "trainer.eval_batches=1", "trainer.checkpoint_every=0", "trainer.sample_every=-1"]


def rank_main(rank: int, world: int, port: int, run_dir: str, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from papertrain.config import load_config
    from papertrain.trainer import Trainer

    Trainer(load_config(RECIPE, [*QUIET, *overrides]), Path(run_dir)).run()


def train(world: int, run_dir: Path, overrides: list[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(rank_main, args=(world, port, str(run_dir), overrides), nprocs=world, join=True)


def read(run_dir: Path, tokens_per_step: int, warmup: int) -> tuple[float, list[float]]:
    from papertrain.metrics import read_metrics

    events = read_metrics(run_dir / "metrics.jsonl")
    memory = next(e for e in events if "memory/params_bytes" in e)
    state = memory["memory/params_bytes"] + memory["memory/grads_bytes"] + memory["memory/optimizer_bytes"]
    times = [tokens_per_step / e["throughput/tokens_per_s"] for e in events
             if "throughput/tokens_per_s" in e and e["step"] > warmup]
    return state, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    args = parser.parse_args()
    tokens_per_step = 32 * 128
    steps = [f"trainer.max_steps={args.steps}"]
    state: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    with tempfile.TemporaryDirectory() as scratch:
        from papertrain.config import load_config
        from papertrain.trainer import Trainer

        single = Path(scratch) / "single"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        Trainer(load_config(RECIPE, [*QUIET, *steps]), single).run()
        single_state, single_times = read(single, tokens_per_step, args.warmup)
        for round_ in range(args.rounds):
            for name, overrides in STRATEGIES.items():
                run_dir = Path(scratch) / f"{name.replace(' ', '_')}-{round_}"
                train(args.ranks, run_dir, [*steps, *overrides])
                state[name], new_times = read(run_dir, tokens_per_step, args.warmup)
                times[name] += new_times
                print(f"round {round_ + 1} {name:<17} median step {statistics.median(new_times) * 1000:7.1f} ms",
                      flush=True)
    print(f"\n{args.ranks} ranks, tiny GPT (0.82M parameters), {args.rounds} alternating rounds x "
          f"{args.steps - args.warmup} timed steps; one process for reference:")
    print(f"{'strategy':<18}{'model state/rank':>18}{'vs 1 process':>14}{'step time':>12}{'vs fsdp2':>10}")
    print(f"{'one process':<18}{single_state:>16,.0f} B{1.0:>13.3f}x{statistics.median(single_times) * 1000:>9.1f} ms{'':>10}")
    fsdp2 = statistics.median(times["fsdp2"])
    for name in STRATEGIES:
        median = statistics.median(times[name])
        print(f"{name:<18}{state[name]:>16,.0f} B{state[name] / single_state:>13.3f}x{median * 1000:>9.1f} ms"
              f"{median / fsdp2:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
