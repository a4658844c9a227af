"""
# GPT-NeoX-20B (Black et al., 2022)

"GPT-NeoX-20B: An Open-Source Autoregressive Language Model" trains a 20-billion-parameter decoder on the
Pile. Its §2.1 lists what differs from GPT-3, and each difference is a few lines below:

1. **Rotary embeddings on a quarter of each head** (§2.1.1). Instead of adding learned position vectors
   to the input, q and k are rotated by an angle proportional to their position (Su et al., 2021), so
   that ⟨q_m, k_n⟩ depends only on m - n. NeoX rotates only the first 25% of each head's dimensions
   (`rotary_pct = 0.25`) "as this was found to speed up training with negligible difference in
   performance"; the other 75% carry content only.
2. **Parallel attention and feed-forward** (§2.1.2). GPT-3 applies them one after the other,
   x + Attn(LN(x)) then + FF(LN(·)). NeoX computes both from the same input and adds both at once:

       x_{l+1} = x_l + Attn(LN₁(x_l)) + FF(LN₂(x_l))

   which lets a tensor-parallel implementation fuse their communication (15% throughput, §2.1.2). The
   paper notes an accidental detail we reproduce: the two branches keep *separate* LayerNorms.
3. **Untied embeddings**: the input embedding (`embed_in`) and the output projection (`embed_out`) are
   separate matrices (GPT-2 ties them).
4. **Dense attention in every layer** (GPT-3 alternated dense and sparse), GELU feed-forward of 4x width,
   and a vocabulary of 50,277 BPE tokens padded to 50,432 rows so that the matrices divide evenly.

The 20B shape (Table 1): 44 layers, d_model 6144, 64 heads of 96 dims (24 rotated), FFN 24,576,
context 2048. Parameter names here follow the Hugging Face layout (`layers.N.attention.query_key_value`,
...) so that released checkpoints load one tensor at a time with no renaming table; see `hf.py`.

Generation caches each layer's keys and values (`KVCache`): producing token t then costs one new row of
q, k, v per layer instead of recomputing all t rows, and attention reads the cached rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveFloat, PositiveInt, Probability

Activation = Literal["gelu", "gelu_fast", "gelu_new", "relu"]


def activation_fn(name: Activation):
    """GELU, exact or with the tanh approximation (NeoX-20B's `gelu_fast`, GPT-2's `gelu_new`)."""
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_fast", "gelu_new"):
        return nn.GELU(approximate="tanh")  # 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation '{name}' (gelu, gelu_fast, gelu_new or relu)")


class PartialRotary(nn.Module):
    """Rotary position embedding on the first `rotary_dims` features of each head (§2.1.1).

    Features are paired *half against half* (GPT-NeoX's layout, not adjacent pairs): feature i is
    rotated with feature i + r/2 for i < r/2, by the angle m·θ_i with θ_i = base^(-2i/r):

        [x_i, x_{i+r/2}] ← [x_i cos mθ_i - x_{i+r/2} sin mθ_i,  x_{i+r/2} cos mθ_i + x_i sin mθ_i]

    The angles are recomputed per call in fp32 (r/2 numbers per position): no buffer to shard, cast or
    materialise when the model is built on the meta device.
    """

    def __init__(self, head_dim: int, rotary_pct: float = 0.25, base: float = 10_000.0):
        super().__init__()
        self.rotary_dims = int(head_dim * rotary_pct)
        if self.rotary_dims % 2:
            raise ValueError(f"rotary_pct={rotary_pct} of {head_dim} head dims gives an odd count")
        self.base = base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, D]; positions: [T] (absolute, so cached generation continues the count)
        r = self.rotary_dims
        if r == 0:
            return x
        theta = self.base ** (-torch.arange(0, r, 2, device=x.device, dtype=torch.float32) / r)  # [r/2]
        angles = positions.to(torch.float32)[:, None] * theta[None, :]  # m·θ_i: [T, r/2]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rotated, passed = x[..., :r], x[..., r:]
        first, second = rotated[..., : r // 2], rotated[..., r // 2:]  # the two halves that form pairs
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return torch.cat((rotated, passed), dim=-1)


@dataclass
class KVCache:
    """Each layer's keys and values for the positions seen so far: [B, H, max_len, D], filled to `length`.

    Allocated once for the whole generation (prompt + new tokens), so decoding never reallocates; the
    memory is 2 · layers · B · max_len · d_model values (NeoX-20B, fp16, 2048 tokens: 1.4 GB per sequence).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> KVCache:
        def shape() -> torch.Tensor:
            return torch.zeros(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)

        return cls([shape() for _ in range(n_layers)], [shape() for _ in range(n_layers)])

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v ([B, H, t, D]) after the cached ones; return all of them so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class NeoXAttention(nn.Module):
    """Multi-head causal self-attention with partial rotary embeddings.

    One matrix computes q, k and v together, laid out head by head: for head h the output rows
    [3·D·h, 3·D·(h+1)) hold that head's q, k, v (each D = d_model / heads rows). Keeping a head's three
    projections adjacent is what lets Megatron-style tensor parallelism split the matrix by heads.
    """

    def __init__(self, d_model: int, n_heads: int, rotary_pct: float, rotary_base: float, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.query_key_value = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.dense = nn.Linear(d_model, d_model, bias=bias)  # W^O
        self.rotary = PartialRotary(self.head_dim, rotary_pct, rotary_base)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [B, H, T, D]
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(layer, k, v)  # [B, H, past + T, D]
        if past == 0:
            mix = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q kᵀ/√D + causal) v
        elif T == 1:  # one new token, the latest position: it sees every cached key, no mask needed
            mix = F.scaled_dot_product_attention(q, k, v)
        else:
            # query i sits at position past + i and sees keys 0 .. past + i
            visible = torch.arange(past + T, device=x.device)[None, :] <= (past + torch.arange(T, device=x.device))[:, None]
            mix = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.dense(mix.transpose(1, 2).reshape(B, T, -1))  # heads concatenated, then W^O


class NeoXMLP(nn.Module):
    """FF(x) = W₂ GELU(W₁ x + b₁) + b₂, with W₁: d_model -> 4·d_model."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(d_model, d_ff)
        self.act = activation_fn(activation)
        self.dense_4h_to_h = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class NeoXLayer(nn.Module):
    """One block: x + Attn(LN₁(x)) + FF(LN₂(x)) (parallel, §2.1.2), or the sequential GPT-3 form."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, rotary_pct: float, rotary_base: float,
                 norm_eps: float, activation: Activation, parallel_residual: bool, attention_bias: bool):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d_model, eps=norm_eps)  # LN₁
        self.post_attention_layernorm = nn.LayerNorm(d_model, eps=norm_eps)  # LN₂ (HF's name for it)
        self.attention = NeoXAttention(d_model, n_heads, rotary_pct, rotary_base, attention_bias)
        self.mlp = NeoXMLP(d_model, d_ff, activation)
        self.parallel_residual = parallel_residual

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        attention = self.attention(self.input_layernorm(x), positions, cache, layer)
        if self.parallel_residual:
            return x + attention + self.mlp(self.post_attention_layernorm(x))  # both branches read x
        x = x + attention
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoX(nn.Module):
    """The decoder: embed_in -> layers -> final LayerNorm -> embed_out (untied). Logits [B, T, vocab]."""

    def __init__(self, vocab_size: PositiveInt = 50432, d_model: PositiveInt = 6144, n_layers: PositiveInt = 44,
                 n_heads: PositiveInt = 64, d_ff: PositiveInt | None = None, block_size: PositiveInt = 2048,
                 rotary_pct: Probability = 0.25, rotary_base: PositiveFloat = 10_000.0, norm_eps: PositiveFloat = 1e-5,
                 activation: Activation = "gelu_fast", parallel_residual: bool = True, attention_bias: bool = True,
                 init_std: PositiveFloat = 0.02):
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.init_std = init_std
        self.embed_in = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            NeoXLayer(d_model, n_heads, d_ff or 4 * d_model, rotary_pct, rotary_base, norm_eps, activation,
                      parallel_residual, attention_bias)
            for _ in range(n_layers))
        self.final_layer_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.embed_out = nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """Heads of d_model/n_heads dimensions, of which int(head_dim·rotary_pct) rotate in pairs (§2.1.1)."""
        d_model, n_heads, rotary_pct = arguments["d_model"], arguments["n_heads"], arguments["rotary_pct"]
        if d_model % n_heads:
            near = min((h for h in range(1, d_model + 1) if d_model % h == 0), key=lambda h: (abs(h - n_heads), -h))
            yield "n_heads", (f"d_model={d_model} must be divisible by n_heads={n_heads} (each head gets "
                              f"d_model/n_heads dimensions); e.g. n_heads={near}")
            return
        head_dim = d_model // n_heads
        rotated = int(head_dim * rotary_pct)
        if rotated % 2:
            fits = [p for p in (round((rotated - 1) / head_dim, 4), round((rotated + 1) / head_dim, 4), 0.0)
                    if 0 <= p <= 1 and int(head_dim * p) % 2 == 0]
            yield "rotary_pct", (f"rotary_pct={rotary_pct} of head_dim={head_dim} (d_model/n_heads) rotates {rotated} "
                                 f"dimensions, an odd count (they rotate in pairs); e.g. rotary_pct={fits[0]:g}")

    def init_weights(self, name: str, module: nn.Module) -> None:
        """For training from scratch: N(0, 0.02) matrices, zero biases. NeoX-20B itself used 'small init'
        (std √(2/5d)) and 'wang init' (2/(L√d)) for the residual outputs; finetuning starts from loaded
        weights, so only the scale matters here. The embedding is tested against HF at this std."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def reset_parameters(self) -> None:
        if self.embed_in.weight.is_meta:
            return  # built on the meta device: the weights come from a checkpoint (hf.py) or the engine
        for name, module in self.named_modules():
            self.init_weights(name, module)

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def new_cache(self, batch: int, max_len: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        reference = self.embed_out.weight
        dtype = dtype or (reference.dtype if reference.dtype.is_floating_point else torch.float16)
        return KVCache.allocate(self.n_layers, batch, self.n_heads, max_len, self.d_model // self.n_heads,
                                device or self.embed_in.weight.device, dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, vocab]. With a cache, the T tokens continue the cached ones."""
        past = cache.length if cache is not None else 0
        T = input_ids.shape[1]
        if past + T > self.block_size:
            raise ValueError(f"{past + T} tokens exceed block_size={self.block_size}")
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions; {past + T} were asked for")
        h = self.embed(input_ids)  # [B, T, d_model]
        for index, layer in enumerate(self.layers):
            h = self.run_block(layer, h, cache, index, past)
        if cache is not None:
            cache.length += T
        return self.head(h)

    # The three pieces of forward, apart, so that a pipeline (strategy=pipeline) can run the first on
    # its first stage, a share of the blocks on each stage, and the last on its last stage.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_in(input_ids)

    def run_block(self, layer: nn.Module, h: torch.Tensor, cache: KVCache | None = None, index: int = 0,
                  past: int = 0) -> torch.Tensor:
        positions = torch.arange(past, past + h.shape[1], device=h.device)
        return layer(h, positions, cache, index)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.embed_out(self.final_layer_norm(h))

    def pipeline_layout(self) -> tuple[list[str], str, list[str]]:
        """(modules of `embed`, the ModuleList of blocks, modules of `head`), for splitting into stages."""
        return ["embed_in"], "layers", ["final_layer_norm", "embed_out"]

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 FLOPs per weight per trained token, plus attention's QKᵀ and AV (2·2·T·d per layer, x3);
        the input embedding is a lookup and does not count."""
        t = seq_len or self.block_size
        weights = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("embed_in"))
        return 6 * weights + 6 * 2 * self.n_layers * t * self.d_model


def parameter_count(vocab_size: int, d_model: int, n_layers: int, d_ff: int | None = None,
                    attention_bias: bool = True) -> int:
    """Closed form of GPTNeoX's parameter count (used by `papertrain plan`; tested against the module)."""
    d_ff = d_ff or 4 * d_model
    attention = 4 * d_model * d_model + (4 * d_model if attention_bias else 0)
    mlp = 2 * d_model * d_ff + d_ff + d_model
    norms = 2 * 2 * d_model
    return 2 * vocab_size * d_model + n_layers * (attention + mlp + norms) + 2 * d_model
