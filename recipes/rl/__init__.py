"""Reinforcement learning: agents that learn from the experience of acting in environments."""
