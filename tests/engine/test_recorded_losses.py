"""The training loop's arithmetic does not drift: fixed-seed CPU runs of a language model (gpt) and an
image classifier (batch_norm) give, bit for bit, the per-step losses recorded in data/recorded_losses.json.

The values were recorded with the engine of 2026-11-24 (before the training contract of issue 13) by
`python tests/engine/test_recorded_losses.py --record`, on a 2-core CPU with torch 2.13.0 and 2 threads.
A change to the loop that changes any loss by one ulp fails here; a change meant to alter the numbers
must re-record and say why in its commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECORDED = HERE / "data" / "recorded_losses.json"
RECIPES = HERE.parents[1] / "recipes"
QUIET = ["trainer.log_every=1", "trainer.progress=none", "trainer.tensorboard=false", "trainer.plot=false",
         "trainer.checkpoint_every=0", "trainer.eval_every=0", "trainer.sample_every=-1", "trainer.eval_batches=1"]
RUNS = {
    "gpt": (RECIPES / "transformers/gpt/tiny.yaml",
            ["trainer.max_steps=25", "trainer.batch_size=8", "model.n_layers=2", "model.d_model=64", "model.dropout=0.1",
             "data.block_size=64", "trainer.grad_accum_steps=2"]),
    "batch_norm": (RECIPES / "normalization/batch_norm/tiny.yaml",
                   ["trainer.max_steps=25", "trainer.batch_size=32", "data.train_examples=2000",
                    "data.val_examples=200"]),
}


def step_losses(name: str, run_dir: Path) -> list[float]:
    from papertrain.config import load_config
    from papertrain.metrics import read_metrics
    from papertrain.trainer import Trainer

    path, overrides = RUNS[name]
    Trainer(load_config(path, [*overrides, *QUIET]), run_dir).run()
    return [e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


def test_losses_equal_the_recorded_ones_bit_for_bit(tmp_path: Path) -> None:
    recorded = json.loads(RECORDED.read_text())
    torch.set_num_threads(recorded["threads"])
    for name in RUNS:
        assert step_losses(name, tmp_path / name) == recorded["losses"][name], name


if __name__ == "__main__" and "--record" in sys.argv:
    import os
    import tempfile

    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        losses = {name: step_losses(name, Path(folder) / name) for name in RUNS}
    RECORDED.write_text(json.dumps({"threads": 2, "torch": torch.__version__, "losses": losses}, indent=1) + "\n")
    print(f"recorded {RECORDED}")
