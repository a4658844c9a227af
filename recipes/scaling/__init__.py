"""Scaling training: how model states are split across processes."""
