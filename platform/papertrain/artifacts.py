"""Artifacts: what a recipe needs built once before it trains (a distillation teacher, a classifier that
scores generated samples, a kNN-LM datastore, a RETRO index, FID reference statistics, an autoencoder).

A task that needs some defines `artifacts(ctx) -> {name: Artifact}` and `use_artifacts({name: loaded})`.
An artifact says what makes it (`settings()`, JSON data), how to build it into a folder, and how to load it:

    class Artifact(Protocol):
        def settings(self) -> dict: ...                        # hashed: the cache key
        def build(self, folder: Path, ctx) -> None: ...        # writes into folder; may resume a partial build
        def load(self, folder: Path, device) -> Any: ...

The stage (`prepare_artifacts`, run by the trainer after the task is built and before `task.prepare`):
- keys each artifact by a hash of its settings: `$PAPERTRAIN_DATA/artifacts/<name>-<hash>/`, so changing
  what makes it builds a new one and never reuses a stale one;
- builds a missing one once per machine (local rank 0, under a file lock, so two jobs or two machines
  sharing the cache never build it twice at once), while the other ranks wait for it; an interrupted
  build resumes from where it stopped (a `TrainedModel` is a run directory, resumed like any run);
- protects the run from the build: the global random generators and thread count are restored after it,
  so a run is the same whether its artifacts were just built or came from the cache;
- says what it did: "artifact teacher: built in 3m12s" or "artifact teacher: cached", with the folder.

`TrainedModel` is the artifact that is a model trained by this same engine (strategy single on the
building rank, the precision, progress bar, checkpoints and resume of any run).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from papertrain.errors import PapertrainError

COMPLETE = "COMPLETE.json"
FAILED = "FAILED.txt"
POLL_S = 1.0


def artifact_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def artifacts_root() -> Path:
    from papertrain.data.sources import cache_dir

    return cache_dir() / "artifacts"


@contextmanager
def _preserved_randomness() -> Iterator[None]:
    from papertrain.seeding import capture_rng, restore_rng

    state, threads = capture_rng(), torch.get_num_threads()
    try:
        yield
    finally:
        restore_rng(state)
        torch.set_num_threads(threads)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another process builds the same artifact
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_artifacts(artifacts: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Build (once) or find each artifact, then load it on every rank."""
    from papertrain.metrics import format_duration

    strategy, loaded = ctx.strategy, {}
    for name, artifact in artifacts.items():
        settings = artifact.settings()
        folder = artifacts_root() / f"{name}-{artifact_key(settings)}"
        done, failed = folder / COMPLETE, folder / FAILED
        if not done.is_file():
            if strategy.local_rank == 0:
                with _lock(folder.with_suffix(".lock")):
                    if not done.is_file():
                        failed.unlink(missing_ok=True)
                        print(f"artifact {name}: building it once, cached in {folder}", flush=True)
                        started = time.perf_counter()
                        folder.mkdir(parents=True, exist_ok=True)
                        (folder / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
                        try:
                            with _preserved_randomness():
                                artifact.build(folder, ctx)
                        except BaseException as err:
                            failed.write_text(f"{type(err).__name__}: {err}")
                            raise
                        seconds = time.perf_counter() - started
                        done.write_text(json.dumps({"name": name, "seconds": round(seconds, 1),
                                                    "built": time.strftime("%Y-%m-%d %H:%M:%S")}))
                        print(f"artifact {name}: built in {format_duration(seconds)}", flush=True)
            else:
                _wait_for(name, done, failed)
        elif strategy.is_main:
            print(f"artifact {name}: cached ({folder})", flush=True)
        loaded[name] = artifact.load(folder, ctx.device)
    return loaded


def _wait_for(name: str, done: Path, failed: Path) -> None:
    """Another rank of this machine builds it; wait for its marker (a file: no collective can time out)."""
    while not done.is_file():
        if failed.is_file():
            raise PapertrainError(f"building artifact {name} failed on this machine's first rank: "
                                  f"{failed.read_text().strip()}", "see that rank's output, fix it, run again")
        time.sleep(POLL_S)


@dataclass
class TrainedModel:
    """A model trained by the engine from a config tree (the same schema as a recipe's YAML)."""

    config: dict[str, Any]

    # how the run shows itself, not what it makes: not part of the cache key
    DISPLAY = ("progress", "tensorboard", "plot", "log_every")

    def settings(self) -> dict[str, Any]:
        trainer = {k: v for k, v in self.config.get("trainer", {}).items() if k not in self.DISPLAY}
        return {**self.config, "trainer": trainer}

    def _loaded_config(self, folder: Path) -> Any:
        from papertrain.config import dump_yaml, load_config

        path = folder / "config.yaml"
        if not path.is_file():
            path.write_text(dump_yaml(self.config))
        return load_config(path)

    def build(self, folder: Path, ctx: Any) -> None:
        from safetensors.torch import save_model

        from papertrain.distributed import ProcessInfo
        from papertrain.strategies.base import SingleDevice
        from papertrain.stopping import Interrupted
        from papertrain.trainer import Trainer

        from papertrain.strategies.base import pick_precision

        config = self._loaded_config(folder)
        precision = pick_precision(config.run.trainer.precision, ctx.device)  # the artifact's own
        alone = SingleDevice(ProcessInfo(0, 1, 0, 1, "none"), ctx.device, precision, config.run.strategy)
        trainer = Trainer(config, folder / "run", strategy=alone)
        result = trainer.run()
        if result.status == "interrupted":
            raise Interrupted(f"interrupted while building an artifact (its run is in {folder / 'run'}); run the "
                              "same command again to continue it")
        save_model(trainer.raw_model, str(folder / "model.safetensors"))
        (folder / "metrics.json").write_text(json.dumps({k: v for k, v in result.metrics.items()
                                                         if k.startswith("val/")}, indent=2))

    def load(self, folder: Path, device: torch.device) -> torch.nn.Module:
        from safetensors.torch import load_model

        model = self._loaded_config(folder).build("model")
        load_model(model, str(folder / "model.safetensors"))
        model = model.to(device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    @staticmethod
    def metrics(folder: Path) -> dict[str, float]:
        path = folder / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}
