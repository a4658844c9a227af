"""Language-model techniques that are not architectures (decoding, ...)."""
