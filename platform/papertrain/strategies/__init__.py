"""Strategies: one process (`single`) now; DDP, FSDP2 and DeepSpeed share the same interface."""

from papertrain.strategies.base import SingleDevice, Strategy, memory_by_kind, pick_device, pick_precision

__all__ = ["SingleDevice", "Strategy", "memory_by_kind", "pick_device", "pick_precision"]
