"""Independent references the tests share: plain float64 math written from the papers, not the code under test.

tests/ is on sys.path (pytest puts a conftest's folder there), so test modules import this by name.
"""
from __future__ import annotations

import math

import torch


def paper_slopes(n: int) -> list:
    """ALiBi paper: geometric 2^(-8/c * k) for c = largest power of 2 <= n, then odd terms of 2c."""
    c = 2 ** int(math.floor(math.log2(n)))
    base = [2.0 ** (-8.0 * k / c) for k in range(1, c + 1)]
    extra = [2.0 ** (-8.0 * k / (2 * c)) for k in range(1, 2 * c + 1)][0::2]
    return base + extra[: n - c]


def dnabert_reference_hidden(sd: dict, cfg, ids: list) -> torch.Tensor:
    """Last hidden state [L, H] of ONE sequence, float64, heads looped, read from the state dict
    by name: DNABERT-S's math (docs/models.md) with the ALiBi paper's slopes, exact GELU, post-LN."""
    sd = {k: v.detach().double() for k, v in sd.items()}
    hidden, heads, inter, eps = (cfg.hidden_size, cfg.num_attention_heads,
                                 cfg.intermediate_size, cfg.layer_norm_eps)
    d = hidden // heads
    length = len(ids)

    def layer_norm(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def linear(x, prefix, bias=True):
        y = torch.einsum("lk,ok->lo", x, sd[prefix + ".weight"])
        return y + sd[prefix + ".bias"] if bias else y

    pos = torch.arange(length, dtype=torch.float64)
    distance = (pos[:, None] - pos[None, :]).abs()
    slopes = paper_slopes(heads)
    x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, "embeddings.LayerNorm")
    for n in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{n}."
        qkv = linear(x, p + "attention.self.Wqkv")
        context = torch.zeros(length, hidden, dtype=torch.float64)
        for h in range(heads):
            q = qkv[:, h * d:(h + 1) * d]
            k = qkv[:, hidden + h * d:hidden + (h + 1) * d]
            v = qkv[:, 2 * hidden + h * d:2 * hidden + (h + 1) * d]
            scores = torch.einsum("id,jd->ij", q, k) / math.sqrt(d) - slopes[h] * distance
            e = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            context[:, h * d:(h + 1) * d] = (e / e.sum(dim=1, keepdim=True)) @ v
        h1 = layer_norm(linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        g = linear(h1, p + "mlp.gated_layers", bias=False)
        gate, up = g[:, :inter], g[:, inter:]
        glu = 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0))) * up
        x = layer_norm(linear(glu, p + "mlp.wo") + h1, p + "mlp.layernorm")
    return x
