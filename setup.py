"""Package layout for setuptools.

The distribution is one import package, `papertrain`, assembled from four source folders:

    platform/papertrain  -> papertrain            (the engine)
    recipes              -> papertrain.recipes    (the papers)
    launch               -> papertrain.launch     (per-rank entry point)
    cluster              -> papertrain.cluster    (Slurm)

`platform/` is a source root like `src/` and must never get an `__init__.py`: it would shadow the
standard library's `platform` module for anyone running Python from the repository root.
Metadata lives in pyproject.toml; this file only computes the package list, which pyproject's static
`packages.find` cannot express for several roots under one prefix.
"""

from setuptools import find_packages, setup

MAPPED_ROOTS = {
    "papertrain.recipes": "recipes",
    "papertrain.launch": "launch",
    "papertrain.cluster": "cluster",
}


def all_packages() -> list[str]:
    packages = find_packages("platform", include=["papertrain", "papertrain.*"])
    for prefix, folder in MAPPED_ROOTS.items():
        packages.append(prefix)
        packages += [f"{prefix}.{name}" for name in find_packages(folder)]
    return packages


setup(
    packages=all_packages(),
    package_dir={"": "platform", **MAPPED_ROOTS},
    package_data={"": ["*.yaml", "*.md", "*.json", "*.txt"]},
    include_package_data=True,
)
