"""Building blocks that several papers share (an idea moves here only when a second paper needs it)."""
