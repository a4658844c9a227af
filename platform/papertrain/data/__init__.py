"""Data: the registry of real data sets (sources), tokenizers, text windows and the step sampler."""

from papertrain.data.sources import REGISTRY, DataSource, resolve
from papertrain.data.text import TextCorpus, TokenWindows
from papertrain.data.tokenizers import CharTokenizer, GPT2Tokenizer, build_tokenizer

__all__ = ["REGISTRY", "CharTokenizer", "DataSource", "GPT2Tokenizer", "TextCorpus", "TokenWindows",
           "build_tokenizer", "resolve"]
