"""Making trained models smaller and cheaper to run: fewer bits per weight (LLM.int8(), ...)."""
