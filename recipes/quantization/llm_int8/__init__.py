"""LLM.int8(): vector-wise int8 quantisation with mixed-precision decomposition (Dettmers et al., 2022)."""
