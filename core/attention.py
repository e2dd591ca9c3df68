"""Variable-length (packed) self-attention for both encoders.

q, k, v are packed [T, heads, head_dim]; `cu_seqlens` [B+1] int32 marks the sequences.
Tokens attend only within their own sequence. Paths, fastest first:
  * CUDA without bias: `torch.nn.attention.varlen.varlen_attn` (flash varlen, no padding);
  * everything else (CPU, ALiBi): pad per batch to the longest sequence, SDPA with a
    key-padding mask plus the optional ALiBi bias, unpad. The GEMMs around attention stay
    packed; only this step sees padding, and length-sorted batches keep it small.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .packing import pad_packed

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # older torch: the padded path below serves everywhere
    _varlen_attn = None


def alibi_bias(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[heads, L, L] symmetric ALiBi bias -slope_h * |i - j| (MosaicBERT / DNABERT-2)."""
    pos = torch.arange(length, device=slopes.device)
    distance = (pos[None, :] - pos[:, None]).abs().to(torch.float32)  # [L, L]
    return (-slopes.to(torch.float32)[:, None, None] * distance).to(dtype)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, alibi_slopes: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Softmax(q k^T * scale + bias) v within each packed sequence -> [T, heads, head_dim]."""
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if (alibi_slopes is None and q.is_cuda and _varlen_attn is not None
            and q.dtype in (torch.float16, torch.bfloat16)):
        return _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    return padded_sdpa(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, scale)


def padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                alibi_slopes: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The reference/fallback path: pad, SDPA with a boolean or additive mask, unpad."""
    qkv = torch.stack((q, k, v), dim=1)                         # [T, 3, H, D]
    padded, mask = pad_packed(qkv, cu_seqlens, max_seqlen)      # [B, L, 3, H, D], [B, L]
    qp, kp, vp = padded.permute(2, 0, 3, 1, 4).unbind(0)        # each [B, H, L, D]
    key_mask = mask[:, None, None, :]                           # [B, 1, 1, L]
    if alibi_slopes is None:
        attn_mask = key_mask
    else:
        bias = alibi_bias(alibi_slopes, max_seqlen, q.dtype)    # [H, L, L]
        attn_mask = bias[None].masked_fill(~key_mask, float("-inf"))  # [B, H, L, L]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=attn_mask, scale=scale)  # [B, H, L, D]
    return out.transpose(1, 2)[mask]                            # [T, H, D]
