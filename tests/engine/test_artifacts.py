"""Artifacts are built once per machine, keyed by their settings, and a failed build stops every rank."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from multiprocess import run_ranks
from papertrain.artifacts import artifact_key, artifacts_root, prepare_artifacts
from papertrain.errors import PapertrainError


class CountingArtifact:
    """Writes a tensor; counts its builds in a file beside the cache (every process sees the same file)."""

    def __init__(self, value: float, counter: Path, fail: bool = False):
        self.value, self.counter, self.fail = value, counter, fail

    def settings(self) -> dict:
        return {"value": self.value}

    def build(self, folder: Path, ctx) -> None:
        with open(self.counter, "a") as handle:
            handle.write(f"{ctx.strategy.rank}\n")
        torch.rand(3)  # draws random numbers: the run's generators must not notice
        if self.fail:
            raise RuntimeError("no room for the index")
        (folder / "value.json").write_text(json.dumps(self.value))

    def load(self, folder: Path, device) -> float:
        return json.loads((folder / "value.json").read_text())


def context(rank: int = 0, local_rank: int = 0) -> SimpleNamespace:
    strategy = SimpleNamespace(rank=rank, local_rank=local_rank, is_main=rank == 0)
    return SimpleNamespace(strategy=strategy, device=torch.device("cpu"))


def test_an_artifact_is_built_once_and_keyed_by_its_settings(tmp_path: Path, capsys) -> None:
    counter = tmp_path / "builds"
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    assert prepare_artifacts({"index": CountingArtifact(1.5, counter)}, context()) == {"index": 1.5}
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random numbers are untouched
    assert "artifact index: built in" in capsys.readouterr().out
    assert prepare_artifacts({"index": CountingArtifact(1.5, counter)}, context()) == {"index": 1.5}
    assert "artifact index: cached" in capsys.readouterr().out
    assert prepare_artifacts({"index": CountingArtifact(2.5, counter)}, context()) == {"index": 2.5}
    assert counter.read_text().splitlines() == ["0", "0"]  # once per settings
    assert (artifacts_root() / f"index-{artifact_key({'value': 2.5})}" / "settings.json").is_file()


def test_a_failed_build_is_reported_and_built_again_next_time(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no room"):
        prepare_artifacts({"index": CountingArtifact(3.0, tmp_path / "builds", fail=True)}, context())
    assert prepare_artifacts({"index": CountingArtifact(3.0, tmp_path / "builds")}, context()) == {"index": 3.0}


def build_on_rank(cache: str, counter: str, fail: bool) -> None:
    import torch.distributed as dist

    os.environ["PAPERTRAIN_DATA"] = cache
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        value = prepare_artifacts({"index": CountingArtifact(4.0, Path(counter), fail)}, context(rank, rank))
        Path(counter).with_suffix(f".rank{rank}").write_text(json.dumps(value))
    except (RuntimeError, PapertrainError) as err:
        Path(counter).with_suffix(f".rank{rank}").write_text(f"error: {err}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fail", [False, True], ids=["built", "failed"])
def test_one_rank_builds_while_the_others_wait(tmp_path: Path, fail: bool) -> None:
    """Two ranks of one machine: local rank 0 builds, rank 1 waits for it and loads the result (or hears of
    the failure) without a collective that could time out during a long build."""
    counter = tmp_path / "builds"
    run_ranks(2, build_on_rank, str(tmp_path / "cache"), str(counter), fail)
    assert counter.read_text().splitlines() == ["0"]
    outcomes = [counter.with_suffix(f".rank{r}").read_text() for r in (0, 1)]
    if fail:
        assert "no room" in outcomes[0] and "building artifact index failed" in outcomes[1], outcomes
    else:
        assert outcomes == ['{"index": 4.0}'] * 2
