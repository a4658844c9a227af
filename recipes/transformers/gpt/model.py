"""
# GPT: generative pre-training of a Transformer decoder (Radford et al., 2018)

"Improving Language Understanding by Generative Pre-Training" trains one model to predict the next
token of ordinary text, and only then adapts it to tasks. The pre-training objective (§3.1, eq. 1) is
the log-likelihood of a corpus U = (u_1, ..., u_n) under a context window of k tokens:

    L₁(U) = Σᵢ log P(uᵢ | u_{i-k}, ..., u_{i-1}; Θ)

The model (eq. 2) is a stack of n Transformer layers over token and position embeddings, read out
through the *same* token embedding matrix:

    h₀ = U W_e + W_p                       token embeddings plus learned position embeddings
    h_l = transformer_block(h_{l-1})       l = 1 .. n, masked (causal) self-attention + FFN
    P(u) = softmax(h_n W_eᵀ)               next-token distribution, output tied to W_e

"Masked" is the key word: position i may only attend to positions ≤ i, so all T next-token
predictions of a window are trained at once, in parallel, without any position seeing its answer.

The paper's model: 12 layers, d_model 768, 12 heads, FFN 3072, GELU, learned positions, context 512,
dropout 0.1, N(0, 0.02) initialisation, and post-norm blocks as in the original Transformer.
GPT-2 (Radford et al., 2019) moved LayerNorm to each block's input and added one after the last block
(`norm_first=True` here) and scaled the residual projections' initialisation by 1/√(2n). Both variants
are tested against the Hugging Face implementations of GPT-1 and GPT-2 with the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Literal

import torch
from torch import nn

from papertrain.config.constraints import PositiveFloat, PositiveInt, Range
from papertrain.recipes.transformers.blocks.model import Activation, LearnedPositions, TransformerLayer
from papertrain.recipes.transformers.mha.model import MultiHeadAttention


class GPT(nn.Module):
    def __init__(self, vocab_size: PositiveInt, block_size: PositiveInt, n_layers: PositiveInt = 12,
                 n_heads: PositiveInt = 12, d_model: PositiveInt = 768, d_ff: PositiveInt | None = None,
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1, norm_first: bool = False,
                 activation: Activation = "gelu", attention_backend: Literal["sdpa", "math"] = "sdpa",
                 norm_eps: PositiveFloat = 1e-5):
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layers, self.d_model = n_layers, d_model
        d_ff = d_ff or 4 * d_model
        self.token_embedding = nn.Embedding(vocab_size, d_model)  # W_e
        self.positions = LearnedPositions(d_model, block_size)  # W_p
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, n_heads, d_ff, dropout=dropout, norm_first=norm_first, activation=activation,
                             attention_backend=attention_backend, norm_eps=norm_eps)
            for _ in range(n_layers))
        # pre-norm blocks leave the residual stream unnormalised, so GPT-2 adds one final LayerNorm
        self.final_norm = nn.LayerNorm(d_model, eps=norm_eps) if norm_first else nn.Identity()
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # P(u) = softmax(h_n W_eᵀ): tied
        self.scale_residual_init = norm_first
        self.reset_parameters()

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """Every layer's attention splits d_model into n_heads heads, so n_heads must divide it."""
        yield from MultiHeadAttention.check_arguments(arguments)

    def init_weights(self, name: str, module: nn.Module) -> None:
        """N(0, 0.02) for every weight matrix (GPT-1 §4.1); zero biases; unit LayerNorm gains.

        With GPT-2's pre-norm (§2.3), the projections that write into the residual stream (W^O and the
        FFN's second layer) get std 0.02/√(2n) instead, so the stream's variance does not grow with depth.
        (The engine also calls this per module when it builds a sharded model, see strategies/base.py.)
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = name.endswith(("attention.out_proj", "ffn.linear2")) and self.scale_residual_init
            std = 0.02 / math.sqrt(2 * self.n_layers) if residual else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def reset_parameters(self) -> None:
        for name, module in self.named_modules():
            self.init_weights(name, module)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] with T <= block_size -> next-token logits [B, T, vocab_size]."""
        if input_ids.shape[1] > self.block_size:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds block_size={self.block_size}")
        h = self.dropout(self.positions(self.token_embedding(input_ids)))  # h₀ = U W_e + W_p
        for layer in self.layers:
            h = layer(h, causal=True)  # masked self-attention: position i sees positions <= i
        return self.lm_head(self.final_norm(h))  # h_n W_eᵀ (softmax is in the loss)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's scores and mix.

        Attention adds 2·2·T·d per layer in the forward pass (QKᵀ and weights·V), x3 for training.
        Embedding lookups are free; the tied output projection is a real matmul and counts.
        """
        t = seq_len or self.block_size
        weights = sum(p.numel() for name, p in self.named_parameters() if "positions" not in name)
        return 6 * weights + 6 * 2 * self.n_layers * t * self.d_model
