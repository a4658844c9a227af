"""What code a recorded result ran: hashes that tell `papertrain ls` when a record has gone stale.

About ten recipes train `transformers.gpt.model.GPT` or import its blocks: a change there changes their
numbers without touching their folders. So a record (results.json) is stamped with three kinds of hash:

    recipe     the recipe's own folder: its .py and .yaml files (not its README or results)
    imports    each other recipe it imports, directly or through another (read from the import
               statements, without running anything), by name: {"gpt": "...", "sampling": "..."}
    engine     papertrain's engine (platform/papertrain), minus the modules that only present results
               (the CLI, the catalog, plots, export, generation, planning): what a training step runs

`stale_parts(recipe, stamp)` names the parts whose code differs now; a record without a stamp (written
before stamping) is "unstamped": nobody knows what it ran.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

# engine modules that show, store or move results but do not change what training computes
PRESENTATION = {"cli.py", "catalog.py", "codehash.py", "compare.py", "export.py", "generation.py", "plan.py",
                "evaluate_run.py", "launcher.py", "warnlog.py", "__main__.py", "metrics.py", "pretrained.py"}
RECIPE_FILES = (".py", ".yaml")


def _digest(files: list[Path], root: Path) -> str:
    hasher = hashlib.sha256()
    for path in sorted(files):
        hasher.update(str(path.relative_to(root)).encode())
        hasher.update(b"\0")
        hasher.update(path.read_bytes())
        hasher.update(b"\0")
    return hasher.hexdigest()[:16]


def folder_hash(folder: Path) -> str:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in RECIPE_FILES
             and "__pycache__" not in p.parts and p.name != "results.json"]
    return _digest(files, folder)


def engine_root() -> Path:
    import papertrain

    return Path(papertrain.__file__).resolve().parent


@lru_cache(maxsize=1)
def engine_hash() -> str:
    root = engine_root()
    files = [p for p in root.rglob("*.py") if "__pycache__" not in p.parts and "recipes" not in p.relative_to(root).parts
             and not (p.parent == root and p.name in PRESENTATION)]
    return _digest(files, root)


def imported_recipes(folder: Path, recipes: dict[str, Any]) -> list[str]:
    """The other recipes a recipe's Python files import, transitively (names, sorted)."""
    by_module = {f"papertrain.recipes.{r.family}.{r.name}": name for name, r in recipes.items()}
    own = next((name for name, r in recipes.items() if Path(r.folder) == Path(folder)), None)
    seen: set[str] = set()
    todo = [own] if own else []
    while todo:
        current = todo.pop()
        for module in _imports_of(Path(recipes[current].folder)):
            for prefix, name in by_module.items():
                if (module == prefix or module.startswith(prefix + ".")) and name not in seen and name != own:
                    seen.add(name)
                    todo.append(name)
    return sorted(seen)


def _imports_of(folder: Path) -> set[str]:
    modules: set[str] = set()
    for path in folder.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module)
                modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    # configs name components too: `_component_: papertrain.recipes.transformers.gpt.model.GPT`
    for path in folder.glob("*.yaml"):
        for word in path.read_text(encoding="utf-8").split():
            if word.startswith("papertrain.recipes."):
                modules.add(word.strip("'\","))
    return modules


def code_stamp(recipe: Any, recipes: dict[str, Any]) -> dict[str, Any]:
    """The hashes a new record is stamped with."""
    imports = imported_recipes(recipe.folder, recipes)
    return {"recipe": folder_hash(Path(recipe.folder)),
            "imports": {name: folder_hash(Path(recipes[name].folder)) for name in imports},
            "engine": engine_hash()}


def stale_parts(recipe: Any, stamp: dict[str, Any] | None, recipes: dict[str, Any]) -> list[str] | None:
    """What changed since the record was made: [] for nothing, None for a record with no stamp."""
    if not stamp:
        return None
    now = code_stamp(recipe, recipes)
    changed = ["recipe"] if now["recipe"] != stamp.get("recipe") else []
    before = stamp.get("imports") or {}
    changed += [name for name in sorted(set(now["imports"]) | set(before))
                if now["imports"].get(name) != before.get(name)]
    if now["engine"] != stamp.get("engine"):
        changed.append("engine")
    return changed
