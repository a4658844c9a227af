"""Transformers: attention, the building blocks, GPT, and their descendants."""
