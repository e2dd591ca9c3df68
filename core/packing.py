"""Packed token streams: many sequences concatenated with no padding.

A packed batch of B sequences is one [T] token stream (T = sum of lengths) plus
`cu_seqlens` [B+1] int32, the cumulative lengths (0, l0, l0+l1, ..., T), the layout
flash-attention's varlen kernels take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor   # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device, non_blocking=True),
                           self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen)


def pack(token_ids: Sequence[np.ndarray]) -> PackedBatch:
    """Concatenates per-sequence token id arrays into one packed batch (on CPU)."""
    lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    cu = np.zeros(len(token_ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    flat = np.concatenate(token_ids).astype(np.int64, copy=False) if len(token_ids) else np.zeros(0, np.int64)
    return PackedBatch(torch.from_numpy(flat), torch.from_numpy(cu), int(lengths.max(initial=0)))


def sequence_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] int64: which sequence of the batch each token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


def positions_in_sequence(cu_seqlens: torch.Tensor, total: int,
                          seq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T] int64: each token's position inside its own sequence (0 at every start).

    `seq`: the `sequence_index` of the same batch, where the caller already has it.
    """
    if seq is None:
        seq = sequence_index(cu_seqlens, total)
    return torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]


def mean_pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, skip_first: int = 0,
                     skip_last: int = 0) -> torch.Tensor:
    """Mean over each sequence's tokens, optionally excluding `skip_first`/`skip_last` tokens.

    hidden [T, H] -> [B, H] in float32. ESM-2 skips BOS and EOS (1, 1); DNABERT-S keeps [CLS]/[SEP] (0, 0).
    """
    total = hidden.shape[0]
    batch = cu_seqlens.numel() - 1
    seq = sequence_index(cu_seqlens, total)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sums = torch.zeros(batch, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    rows = hidden.float()
    if skip_first or skip_last:
        # Excluded tokens (ESM-2's BOS/EOS) are zeroed rather than dropped: a boolean index would
        # make the host wait for the device (its output size) once per forward.
        pos = positions_in_sequence(cu_seqlens, total, seq)
        keep = (pos >= skip_first) & (pos < lengths[seq] - skip_last)
        rows = rows * keep[:, None]   # not in place: float() of a float32 hidden is hidden itself
    sums.index_add_(0, seq, rows)
    counts = (lengths - skip_first - skip_last).clamp(min=1).to(torch.float32)
    return sums / counts[:, None]


def mean_pool_padded(hidden: torch.Tensor, mask: torch.Tensor, skip_first: int = 0,
                     skip_last: int = 0) -> torch.Tensor:
    """`mean_pool_packed` for a right-padded batch: hidden [B, L, H], mask [B, L] bool -> [B, H]
    float32 (the ONNX export and the benchmarks' padded paths; plain tensor ops, traceable)."""
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]                 # [1, L]
    lengths = mask.sum(dim=1, keepdim=True)                                              # [B, 1]
    keep = mask & (positions >= skip_first) & (positions < lengths - skip_last)
    weights = keep.to(torch.float32).unsqueeze(-1)                                       # [B, L, 1]
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
