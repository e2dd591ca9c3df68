"""Variable-length (packed) self-attention for both encoders.

q, k, v are packed [T, heads, head_dim]; `cu_seqlens` [B+1] int32 marks the sequences.
Tokens attend only within their own sequence. Everything that depends only on the batch
layout (indices, masks, the ALiBi bias) is built once per forward in a `PackedAttention`
and reused by every layer. Paths, fastest first:
  * "flash": CUDA, fp16/bf16, no bias: `torch.nn.attention.varlen.varlen_attn` on the
    packed stream, no padding at all;
  * "padded": everything else (CPU, fp32, ALiBi): scatter the packed tokens into
    [B, L] slots, SDPA with a key-padding mask plus the optional ALiBi bias, gather back.
    The GEMMs around attention stay packed; only this step sees padding, and
    length-sorted packs keep it small.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .packing import positions_in_sequence, sequence_index


@functools.lru_cache(maxsize=None)
def _varlen_attn():
    """torch's flash varlen kernel (torch >= 2.10), or None. Imported on first use: the
    import pulls in torch._dynamo, seconds of start-up that CPU processes never need."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def alibi_bias(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[heads, L, L] symmetric ALiBi bias -slope_h * |i - j| (MosaicBERT / DNABERT-2)."""
    pos = torch.arange(length, device=slopes.device)
    distance = (pos[None, :] - pos[:, None]).abs().to(torch.float32)  # [L, L]
    return (-slopes.to(torch.float32)[:, None, None] * distance).to(dtype)


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and _varlen_attn() is not None)


class PackedAttention:
    """Attention for one packed batch; build once per forward, call once per layer."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, total: int, dtype: torch.dtype,
                 alibi_slopes: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                 head_dim: Optional[int] = None, backend: str = "auto"):
        if backend not in ("auto", "flash", "padded"):
            raise ValueError(f"unknown attention backend {backend!r}")
        device = cu_seqlens.device
        if backend == "auto":
            backend = "flash" if alibi_slopes is None and flash_varlen_available(device, dtype) else "padded"
        if backend == "flash" and (alibi_slopes is not None or not flash_varlen_available(device, dtype)):
            raise ValueError("the flash varlen path needs CUDA, fp16/bf16 and no bias")
        self.backend = backend
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.scale = scale if scale is not None or head_dim is None else 1.0 / math.sqrt(head_dim)
        if backend == "padded":
            # Slots of L tokens per sequence; on CUDA L is rounded up to 8 so the bias rows
            # are 16-byte aligned (the memory-efficient SDPA kernel wants that).
            length = max_seqlen if device.type != "cuda" else -(-max_seqlen // 8) * 8
            batch = cu_seqlens.numel() - 1
            self.seq = sequence_index(cu_seqlens, total)                          # [T]
            self.pos = positions_in_sequence(cu_seqlens, total)                   # [T]
            self.batch, self.length = batch, length
            slot = self.seq * length + self.pos                                   # [T]
            # For every slot, the token it holds; pad slots read token 0: their keys are
            # masked out and their outputs never read, so what they hold does not matter.
            self.token_of_slot = torch.zeros(batch * length, dtype=torch.long, device=device)
            self.token_of_slot[slot] = torch.arange(total, device=device)
            real = torch.zeros(batch * length, dtype=torch.bool, device=device)
            real[slot] = True
            key_mask = real.view(batch, 1, 1, length)                            # [B, 1, 1, L]
            if alibi_slopes is None:
                self.mask = key_mask
            else:
                bias = alibi_bias(alibi_slopes, length, dtype)                    # [heads, L, L]
                self.mask = bias[None].masked_fill(~key_mask, float("-inf"))      # [B, heads, L, L]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [T, heads, head_dim] -> [T, heads, head_dim]."""
        if self.backend == "flash":
            return self._flash(q, k, v)
        return self.attend_qkv(torch.stack((q, k, v), dim=1))

    def attend_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, 3, heads, head_dim] (a fused projection's output, as is) -> [T, heads, head_dim]."""
        if self.backend == "flash":
            return self._flash(*qkv.unbind(1))
        total, _, heads, head_dim = qkv.shape
        # One gather into [B, L] slots, no zero-filling, no stacking (on the GPU, the scatter
        # and stack this replaces took 30% of DNABERT-S's time).
        slots = qkv.index_select(0, self.token_of_slot).view(self.batch, self.length, 3, heads, head_dim)
        q, k, v = slots.permute(2, 0, 3, 1, 4).unbind(0)                      # each [B, heads, L, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=self._scale(head_dim))
        return out.transpose(1, 2)[self.seq, self.pos]                         # [T, heads, d]

    def _scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _varlen_attn()(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                              scale=self._scale(q.shape[-1]))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, alibi_slopes: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """One-shot form of `PackedAttention` (builds the layout for this call only)."""
    plan = PackedAttention(cu_seqlens, max_seqlen, q.shape[0], q.dtype, alibi_slopes, scale, q.shape[-1])
    return plan(q, k, v)
