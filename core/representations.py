"""What an embedding request may ask for beyond the mean: which layer, the first token, every token.

fair-esm's `extract.py` names them: `--repr_layers` (0 = the embeddings, k = after k layers,
negative from the end), `--include mean per_tok bos`. The mean and the per-token rows cover the
same tokens (ESM-2: the residues, BOS/EOS left out; DNABERT-S: every token, [CLS] and [SEP] in), so
the mean of a sequence's per-token rows is its mean embedding.
"""
from __future__ import annotations

from typing import Optional

import torch

from .alphabets import INCLUDE_CHOICES  # noqa: F401  (shared with the client)
from .packing import positions_in_sequence, sequence_index


def representation_layer(layer: Optional[int], num_layers: int) -> int:
    """A representation layer as a count of layers run: None or -1 = the last; negative counts
    from the end (-2 = one before the last); 0 = the embeddings. ValueError outside [-(n+1), n]."""
    if layer is None:
        return num_layers
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"layer {layer} is outside this model's 0..{num_layers} (or -{num_layers + 1}..-1)")
    return layer if layer >= 0 else num_layers + 1 + layer


def kept_token_rows(cu_seqlens: torch.Tensor, total: int, skip_first: int, skip_last: int):
    """(keep [T] bool, position among the kept rows of its sequence [T], sequence [T]) for a packed
    batch: the tokens the mean averages."""
    seq = sequence_index(cu_seqlens, total)
    pos = positions_in_sequence(cu_seqlens, total, seq)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    keep = (pos >= skip_first) & (pos < lengths[seq] - skip_last)
    return keep, pos - skip_first, seq


class Rows:
    """What one Embedder launch fills on the device, every row in input order: the mean [N, H],
    and where asked the first token's row [N, H] and the per-token rows, back to back [K, H]
    (sequence i's at token_offsets[i]:token_offsets[i + 1])."""

    def __init__(self, kept_lengths, hidden: int, device: torch.device, include=("mean",)):
        import numpy as np
        unknown = set(include) - set(INCLUDE_CHOICES)
        if unknown:
            raise ValueError(f"include takes {', '.join(INCLUDE_CHOICES)}, got {', '.join(sorted(unknown))}")
        n = len(kept_lengths)
        self.mean = torch.empty(n, hidden, dtype=torch.float32, device=device)
        self.bos = torch.empty(n, hidden, dtype=torch.float32, device=device) if "bos" in include else None
        self.token_offsets = np.concatenate([[0], np.cumsum(kept_lengths, dtype=np.int64)])
        self.tokens = None
        if "per_token" in include:
            self.tokens = torch.empty(int(self.token_offsets[-1]), hidden, dtype=torch.float32, device=device)
            self._offsets = torch.from_numpy(self.token_offsets[:-1]).to(device)

    def store(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, index: torch.Tensor,
              skip_first: int, skip_last: int) -> None:
        """One pack's hidden states [T, H] (sequences `index` [B] of the input) into the rows."""
        from .packing import mean_pool_packed
        self.mean.index_copy_(0, index, mean_pool_packed(hidden, cu_seqlens, skip_first, skip_last))
        if self.bos is not None:
            self.bos.index_copy_(0, index, hidden[cu_seqlens[:-1].long()].float())
        if self.tokens is not None:
            keep, pos, seq = kept_token_rows(cu_seqlens, hidden.shape[0], skip_first, skip_last)
            where = self._offsets[index[seq]] + pos                       # [T] row in self.tokens
            self.tokens.index_copy_(0, where[keep], hidden[keep].float())

    def fill_nan(self, index: torch.Tensor) -> None:
        """Rows of sequences that were not computed (cancelled, or too large for the device)."""
        for rows in (self.mean, self.bos):
            if rows is not None:
                rows[index] = float("nan")

    def tensors(self) -> dict:
        return {name: t for name, t in (("mean", self.mean), ("bos", self.bos), ("per_token", self.tokens))
                if t is not None}
