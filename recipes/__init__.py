"""The papers, one folder each: `papertrain.recipes.<family>.<paper>` (see `papertrain ls`)."""
