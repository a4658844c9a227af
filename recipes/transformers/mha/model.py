"""
# Multi-headed attention (Vaswani et al., 2017, "Attention Is All You Need", §3.2)

Attention is a soft dictionary lookup. Each query asks a question, each key advertises what its
position holds, and each value is what that position hands back. A query's answer is the average of all
values, weighted by how well the query matches each key:

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V                                     (eq. 1)

Q is [T_q, d_k], K is [T_k, d_k], V is [T_k, d_v]: the score matrix Q Kᵀ is [T_q, T_k], one row of
match scores per query. The scale 1/√d_k keeps those scores at unit variance when q and k have
unit-variance entries (a dot product of d_k terms has variance d_k); without it the softmax saturates
and its gradients vanish as d_k grows (§3.2.1, footnote 4).

One lookup can only ask one question per position. Multi-head attention asks h questions at once, each
in its own learned d_k = d_model / h dimensional subspace, and mixes the answers:

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)                                   (§3.2.2)

Masks decide which keys a query may see: a causal mask hides the future in a language model (§3.2.3),
a padding mask hides the filler tokens of short sequences.

Two ways to compute eq. 1 live here: `attention()` spells the equation out (and can return the
attention weights, for plots), and the `sdpa` backend calls PyTorch's fused kernel, which computes the
same function without materialising the [T_q, T_k] matrix in training. The tests hold them equal.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt, Range


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """[T_q, T_k] booleans, True where query i may attend to key j.

    Queries are the *last* T_q positions of the T_k keys (as when a cache holds the earlier keys), so
    query i sits at absolute position T_k - T_q + i and sees keys 0 .. T_k - T_q + i.
    """
    offset = t_k - t_q
    i = torch.arange(t_q, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    return j <= i + offset


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 written out. q: [B, H, T_q, d_k], k: [B, H, T_k, d_k], v: [B, H, T_k, d_v].

    `mask` (broadcastable to [B, H, T_q, T_k]) is boolean, True = may attend. Returns the output
    [B, H, T_q, d_v] and the attention weights [B, H, T_q, T_k].
    """
    d_k = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # [B, H, T_q, T_k]: every query against every key
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: hidden keys get no weight
    weights = scores.softmax(dim=-1)  # each row sums to 1 over the keys
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)  # attention dropout (§5.4 applies it to sub-layers)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """h heads of scaled dot-product attention in d_model/h dimensional subspaces, then W^O.

    The h projections W_i^Q (and likewise K, V) are stored as one [d_model, d_model] matrix whose rows
    are the heads' blocks, and Q, K, V as one [3·d_model, d_model] `qkv_proj` (the layout of
    `torch.nn.MultiheadAttention.in_proj_weight`): self-attention then needs one matrix product.
    """

    def __init__(self, d_model: PositiveInt, n_heads: PositiveInt, dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
                 bias: bool = True, backend: Literal["sdpa", "math"] = "sdpa"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.backend = backend
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)  # [W^Q; W^K; W^V], all heads
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W^O

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """Each head gets d_k = d_model / h dimensions (§3.2.2), so h must divide d_model. Models built of
        these layers call this from their own check_arguments."""
        d_model, n_heads = arguments["d_model"], arguments["n_heads"]
        if d_model % n_heads:
            near = min((h for h in range(1, d_model + 1) if d_model % h == 0), key=lambda h: (abs(h - n_heads), -h))
            yield "n_heads", (f"d_model={d_model} must be divisible by n_heads={n_heads} (each head gets "
                              f"d_model/n_heads dimensions); e.g. n_heads={near}")

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d_model] -> [B, H, T, d_k]: head i gets features i·d_k .. (i+1)·d_k."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_k).transpose(1, 2)

    def project(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q W^Q, K W^K, V W^V for all heads; one product when it is self-attention."""
        if key is None and value is None:
            q, k, v = self.qkv_proj(query).chunk(3, dim=-1)
        else:
            key = query if key is None else key
            value = key if value is None else value
            w_q, w_k, w_v = self.qkv_proj.weight.chunk(3, dim=0)
            b_q, b_k, b_v = (self.qkv_proj.bias.chunk(3) if self.qkv_proj.bias is not None else (None,) * 3)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, causal: bool = False, need_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """query: [B, T_q, d_model]; key, value: [B, T_k, d_model] (None: self-attention).

        `mask`: boolean, broadcastable to [B, H, T_q, T_k], True = may attend (e.g. [B, 1, 1, T_k] for
        padding). `causal`: also hide later positions. Returns [B, T_q, d_model] (and the weights
        [B, H, T_q, T_k] if `need_weights`).
        """
        q, k, v = self.project(query, key, value)  # [B, H, T, d_k] each
        t_q, t_k = q.shape[2], k.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if self.backend == "sdpa" and not need_weights:
            if causal and mask is None and t_q == t_k:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:
                if causal:
                    future = causal_mask(t_q, t_k, q.device)
                    mask = future if mask is None else mask & future
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            if causal:
                future = causal_mask(t_q, t_k, q.device)
                mask = future if mask is None else mask & future
            out, weights = attention(q, k, v, mask, dropout_p)
        b = out.shape[0]
        out = self.out_proj(out.transpose(1, 2).reshape(b, t_q, self.d_model))  # Concat(heads) W^O
        return (out, weights) if need_weights else out


# --- A network that needs nothing but attention: dictionary lookup ------------------------------------

class LookupNetwork(nn.Module):
    """Embeddings -> `n_layers` x (multi-head attention + feed-forward, each residual, pre-norm) -> class.

    The recipe's task (task.py) is a literal dictionary: a sequence of (key, value) entries followed by
    a query key, and the answer is the value stored under that key. Nothing but the query-key match of
    eq. 1 can solve it: the entries come in random order, so position carries no information, and only
    attention lets the query reach the matching entry. `attention_maps()` returns the weights so the
    run can plot where each query looked.
    """

    def __init__(self, vocab_size: PositiveInt, n_classes: PositiveInt, d_model: PositiveInt = 64,
                 n_heads: PositiveInt = 4, n_layers: PositiveInt = 1, d_ff: PositiveInt = 128,
                 backend: Literal["sdpa", "math"] = "sdpa"):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.attention = nn.ModuleList(MultiHeadAttention(d_model, n_heads, backend=backend)
                                       for _ in range(n_layers))
        self.attention_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_ff), nn.GELU(),
                                               nn.Linear(d_ff, d_model)) for _ in range(n_layers))
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, n_classes))

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        yield from MultiHeadAttention.check_arguments(arguments)

    def forward(self, tokens: torch.Tensor, return_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens: [B, T] with the query last -> class logits [B, n_classes] read at the query."""
        x = self.embedding(tokens)  # [B, T, d_model]
        maps = []
        for attend, norm, ffn in zip(self.attention, self.attention_norms, self.ffn):
            if return_weights:
                update, weights = attend(norm(x), need_weights=True)
                maps.append(weights)
            else:
                update = attend(norm(x))
            x = x + update
            x = x + ffn(x)
        logits = self.head(x[:, -1])  # the query's position holds the answer
        return (logits, maps) if return_weights else logits
