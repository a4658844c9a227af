"""
# The Transformer's building blocks (Vaswani et al., 2017, "Attention Is All You Need", §3)

The Transformer is attention (see ../mha) plus four small pieces, stacked:

1. **Embeddings** (§3.4): a learned vector per token, multiplied by √d_model so that the embedding and
   the positional signal added to it have comparable scale.
2. **Positions** (§3.5): attention is blind to order, so position is added to each embedding, either
   as fixed sinusoids of geometrically spaced wavelengths,

       PE(pos, 2i)   = sin(pos / 10000^{2i/d_model})
       PE(pos, 2i+1) = cos(pos / 10000^{2i/d_model})

   (for any offset k, PE(pos + k) is a fixed rotation of PE(pos), which lets attention express
   relative offsets), or as a learned table (as GPT does).
3. **The position-wise feed-forward network** (§3.3): the same two-layer MLP at every position,

       FFN(x) = max(0, x W₁ + b₁) W₂ + b₂,         W₁: d_model -> d_ff (= 4 d_model)

4. **Residual connections and layer normalisation** around every sub-layer (§3.1, §5.4 dropout):

       post-norm (the paper):   x = LayerNorm(x + Dropout(Sublayer(x)))
       pre-norm (GPT-2 onward): x = x + Dropout(Sublayer(LayerNorm(x)))

   Pre-norm keeps an identity path from the output to the input, which trains deep stacks without a
   long warmup; post-norm is what the paper used.

An encoder layer is self-attention then the FFN. A decoder layer adds a third sub-layer in the middle:
cross-attention, whose queries come from the decoder and whose keys and values are the encoder's
output. The decoder's self-attention is causal, so that position i only sees outputs before it (§3.2.3).
`EncoderDecoder` assembles the whole model of Figure 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import NonNegativeInt, PositiveInt, Range
from papertrain.recipes.transformers.mha.model import MultiHeadAttention

Activation = Literal["relu", "gelu", "gelu_tanh"]


def activation_fn(name: Activation):
    """ReLU is the paper's; GELU (exact, or its tanh approximation) is GPT's."""
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation '{name}' (relu, gelu or gelu_tanh)")


class TokenEmbedding(nn.Module):
    """Token ids -> vectors, scaled by √d_model (§3.4) when `scale` is set (GPT does not scale)."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.factor = math.sqrt(d_model) if scale else 1.0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens) * self.factor  # [B, T] -> [B, T, d_model]


def sinusoidal_table(max_len: int, d_model: int, base: float = 10_000.0) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos·ω_i), PE[pos, 2i+1] = cos(pos·ω_i), ω_i = base^(-2i/d_model). [max_len, d_model]"""
    position = torch.arange(max_len, dtype=torch.float64)[:, None]  # [L, 1]
    omega = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # [d/2]
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * omega)
    table[:, 1::2] = torch.cos(position * omega[: d_model // 2])
    return table.float()


class SinusoidalPositions(nn.Module):
    """Adds the fixed sinusoidal table (§3.5); no parameters, any length up to `max_len`."""

    def __init__(self, d_model: int, max_len: int = 4096):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the table (a model built on the meta device gets its buffers only later)."""
        with torch.no_grad():
            self.table.copy_(sinusoidal_table(*self.table.shape))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x + self.table[offset:offset + x.shape[1]]  # [B, T, d_model]


class LearnedPositions(nn.Module):
    """Adds a learned vector per position (the paper found it "nearly identical", Table 3 row E)."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.shape[1]
        if offset + t > self.embedding.num_embeddings:
            raise ValueError(f"sequence of {offset + t} positions exceeds max_len={self.embedding.num_embeddings}")
        positions = torch.arange(offset, offset + t, device=x.device)
        return x + self.embedding(positions)


class FeedForward(nn.Module):
    """FFN(x) = act(x W₁ + b₁) W₂ + b₂, the same at every position (§3.3)."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation = "relu", dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.activation = activation
        self.act = activation_fn(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.act(self.linear1(x))))


class TransformerLayer(nn.Module):
    """Self-attention then FFN, each wrapped in residual + LayerNorm (§3.1).

    The encoder layer of the paper; with `causal=True` in forward it is also the layer of decoder-only
    language models such as GPT, which have no encoder to cross-attend to.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
                 activation: Activation = "relu", attention_backend: Literal["sdpa", "math"] = "sdpa",
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.attention = MultiHeadAttention(d_model, n_heads, dropout=dropout, backend=attention_backend)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout=0.0)
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)  # "applied to the output of each sub-layer" (§5.4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout(self.attention(self.norm1(x), mask=mask, causal=causal))
            return x + self.dropout(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attention(x, mask=mask, causal=causal)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, then FFN (§3.1, Figure 1 right)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
                 activation: Activation = "relu", attention_backend: Literal["sdpa", "math"] = "sdpa",
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.self_attention = MultiHeadAttention(d_model, n_heads, dropout=dropout, backend=attention_backend)
        self.cross_attention = MultiHeadAttention(d_model, n_heads, dropout=dropout, backend=attention_backend)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout=0.0)
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                self_mask: torch.Tensor | None = None) -> torch.Tensor:
        """y: [B, T_y, d] decoder states; memory: [B, T_x, d] encoder output; masks True = may attend."""
        if self.norm_first:
            y = y + self.dropout(self.self_attention(self.norm1(y), mask=self_mask, causal=True))
            y = y + self.dropout(self.cross_attention(self.norm2(y), memory, memory, mask=memory_mask))
            return y + self.dropout(self.ffn(self.norm3(y)))
        y = self.norm1(y + self.dropout(self.self_attention(y, mask=self_mask, causal=True)))
        y = self.norm2(y + self.dropout(self.cross_attention(y, memory, memory, mask=memory_mask)))
        return self.norm3(y + self.dropout(self.ffn(y)))


def padding_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B, T] -> [B, 1, 1, T] booleans, True for real tokens: every query may attend to them only."""
    return (tokens != pad_id)[:, None, None, :]


class EncoderDecoder(nn.Module):
    """The Transformer of Figure 1: N encoder layers, N decoder layers, a shared vocabulary.

    As in §3.4, the source embedding, the target embedding and the output projection (pre-softmax)
    share one weight matrix.
    """

    def __init__(self, vocab_size: PositiveInt, d_model: PositiveInt = 512, n_heads: PositiveInt = 8,
                 n_layers: PositiveInt = 6, d_ff: PositiveInt = 2048,
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1, max_len: PositiveInt = 512,
                 positions: Literal["sinusoidal", "learned"] = "sinusoidal", norm_first: bool = False,
                 pad_id: NonNegativeInt = 0, activation: Activation = "relu"):
        super().__init__()
        self.pad_id = pad_id
        self.embed = TokenEmbedding(vocab_size, d_model, scale=True)
        self.positions = (SinusoidalPositions(d_model, max_len) if positions == "sinusoidal"
                          else LearnedPositions(d_model, max_len))
        self.embed_dropout = nn.Dropout(dropout)
        layer_args = dict(d_model=d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout, norm_first=norm_first,
                          activation=activation)
        self.encoder = nn.ModuleList(TransformerLayer(**layer_args) for _ in range(n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(**layer_args) for _ in range(n_layers))
        # pre-norm stacks end with one more LayerNorm, since no sub-layer output is normalised otherwise
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.output = nn.Linear(d_model, vocab_size, bias=False)
        self.output.weight = self.embed.embedding.weight  # shared with the embeddings (§3.4)
        self.reset_parameters()

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """h must divide d_model (§3.2.2), and the padding token must be a row of the shared embedding
        (greedy decoding feeds it back in after EOS)."""
        yield from MultiHeadAttention.check_arguments(arguments)
        pad_id, vocab_size = arguments["pad_id"], arguments["vocab_size"]
        if pad_id >= vocab_size:
            yield "pad_id", (f"pad_id={pad_id} is not a token of the vocabulary (vocab_size={vocab_size}); "
                             f"use an id below {vocab_size}, e.g. pad_id=0")

    def init_weights(self, name: str, module: nn.Module) -> None:
        """Glorot-uniform weight matrices, as the reference implementation of the paper did."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.xavier_uniform_(module.weight)

    def reset_parameters(self) -> None:
        for name, module in self.named_modules():
            self.init_weights(name, module)

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source: [B, T_x] -> memory [B, T_x, d_model] and its padding mask."""
        mask = padding_mask(source, self.pad_id)
        x = self.embed_dropout(self.positions(self.embed(source)))
        for layer in self.encoder:
            x = layer(x, mask=mask)
        return self.encoder_norm(x), mask

    def decode(self, target_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """target_in: [B, T_y] (shifted right, starting with BOS) -> logits [B, T_y, vocab]."""
        y = self.embed_dropout(self.positions(self.embed(target_in)))
        for layer in self.decoder:
            y = layer(y, memory, memory_mask=memory_mask)
        return self.output(self.decoder_norm(y))

    def forward(self, source: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        memory, memory_mask = self.encode(source)
        return self.decode(target_in, memory, memory_mask)

    @torch.no_grad()
    def greedy_decode(self, source: torch.Tensor, bos_id: int, eos_id: int, max_len: int) -> torch.Tensor:
        """Emit the most likely next token until EOS or `max_len`: [B, T_x] -> [B, <= max_len]."""
        memory, memory_mask = self.encode(source)
        out = torch.full((source.shape[0], 1), bos_id, dtype=torch.long, device=source.device)
        finished = torch.zeros(source.shape[0], dtype=torch.bool, device=source.device)
        for _ in range(max_len):
            next_token = self.decode(out, memory, memory_mask)[:, -1].argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, self.pad_id), next_token)
            out = torch.cat([out, next_token[:, None]], dim=1)
            finished |= next_token == eos_id
            if finished.all():
                break
        return out[:, 1:]
