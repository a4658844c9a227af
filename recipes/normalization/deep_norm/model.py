"""
# DeepNorm (Wang, Ma, Dong, Huang, Zhang & Wei, 2022)

"DeepNet: Scaling Transformers to 1,000 Layers". The original Transformer normalizes *after* each
residual addition (Post-LN), x_{l+1} = LN(x_l + G_l(x_l)), which generalizes well but becomes unstable as
depth grows: the paper traces it (§3) to the *model update* ‖ΔF‖ at the start of training. Each of N layers
changes the output a little, those changes add up through the stack, and the first Adam steps (which
move every parameter by about the learning rate, whatever its gradient) push the LayerNorms' inputs into
a region where their gradients vanish; training then stalls or diverges. Pre-LN avoids this but loses
accuracy. DeepNorm keeps Post-LN and bounds the update with two constants (§4, Figure 2):

    x_{l+1} = LN(α · x_l + G_l(x_l, θ_l))                  up-weight the residual by α > 1
    W ~ Xavier-normal · β for the FFN, W^V and W^O          down-scale the sub-layers' initialization
    W ~ Xavier-normal     for W^Q and W^K                   (they do not change the output's scale)

Theorem 4.1 shows the update stays O(1) when α and β are chosen for the depth. For a decoder-only model
with N layers (Table 1; a "layer" is one block with attention and FFN, each a sub-layer):

    α = (2N)^{1/4},    β = (8N)^{-1/4}

`DeepNormGPT` is a character-level decoder-only Transformer whose blocks are Post-LN; `deepnorm=True`
applies the two constants, `deepnorm=False` is the plain Post-LN Transformer with the same Xavier
initialization. The test trains both at a depth where plain Post-LN fails and DeepNorm learns.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from papertrain.config.constraints import PositiveInt
from papertrain.recipes.normalization.layer_norm.model import LayerNorm
from papertrain.recipes.transformers.blocks.model import FeedForward, LearnedPositions
from papertrain.recipes.transformers.mha.model import MultiHeadAttention


def deepnorm_constants(n_layers: int) -> tuple[float, float]:
    """(α, β) for a decoder-only Transformer of `n_layers` blocks (the paper's Table 1)."""
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


class PostLNBlock(nn.Module):
    """x ← LN(α x + Attention(x)), then x ← LN(α x + FFN(x)): Post-LN, with DeepNorm's α (1: plain)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.attention = MultiHeadAttention(d_model, n_heads)
        self.ffn = FeedForward(d_model, d_ff, activation="gelu")
        self.norm1, self.norm2 = LayerNorm(d_model), LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.alpha * x + self.attention(x, causal=True))  # LN(α x + G(x))
        return self.norm2(self.alpha * x + self.ffn(x))


class DeepNormGPT(nn.Module):
    """Embeddings -> N Post-LN blocks (DeepNorm's or plain) -> next-token logits."""

    def __init__(self, vocab_size: PositiveInt, block_size: PositiveInt, n_layers: PositiveInt = 24,
                 n_heads: PositiveInt = 4, d_model: PositiveInt = 64, d_ff: PositiveInt | None = None,
                 deepnorm: bool = True):
        super().__init__()
        self.vocab_size, self.block_size, self.n_layers, self.deepnorm = vocab_size, block_size, n_layers, deepnorm
        self.alpha, self.beta = deepnorm_constants(n_layers) if deepnorm else (1.0, 1.0)
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.positions = LearnedPositions(d_model, block_size)
        self.layers = nn.ModuleList(PostLNBlock(d_model, n_heads, d_ff or 4 * d_model, self.alpha)
                                    for _ in range(n_layers))
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        yield from MultiHeadAttention.check_arguments(arguments)

    def init_weights(self, name: str, module: nn.Module) -> None:
        """Xavier-normal everywhere; gain β for the FFN, W^V and W^O (the sub-layers' output side)."""
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if not isinstance(module, nn.Linear):
            return
        if name.endswith("attention.qkv_proj"):  # [W^Q; W^K; W^V]: only W^V gets β
            for part, gain in zip(module.weight.data.chunk(3, dim=0), (1.0, 1.0, self.beta)):
                nn.init.xavier_normal_(part, gain=gain)
        else:
            output_side = name.endswith(("attention.out_proj", "ffn.linear1", "ffn.linear2"))
            nn.init.xavier_normal_(module.weight, gain=self.beta if output_side else 1.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

    def reset_parameters(self) -> None:
        for name, module in self.named_modules():
            self.init_weights(name, module)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, vocab_size]."""
        if input_ids.shape[1] > self.block_size:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds block_size={self.block_size}")
        h = self.positions(self.token_embedding(input_ids))
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)
