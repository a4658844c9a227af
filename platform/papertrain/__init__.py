"""papertrain: annotated paper re-implementations as recipes on one PyTorch engine.

The engine lives here (config, trainer, checkpoint, data, metrics, strategies, cli); the papers live in
`papertrain.recipes`, one folder per paper.
"""

__version__ = "0.1.0"
