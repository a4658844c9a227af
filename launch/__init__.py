"""Per-process entry point: `python -m papertrain.launch RECIPE|CONFIG [key=value ...]` (see __main__)."""
