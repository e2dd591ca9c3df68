"""Variable-length (packed) self-attention for both encoders.

q, k, v are packed [T, heads, head_dim]; `cu_seqlens` [B+1] int32 marks the sequences.
Tokens attend only within their own sequence. Everything that depends only on the batch
layout (indices, masks, the ALiBi bias) is built once per forward in a `PackedAttention`
and reused by every layer. Paths, fastest first:
  * "flash": CUDA, fp16/bf16, no bias: `torch.nn.attention.varlen.varlen_attn` on the
    packed stream, no padding at all;
  * "flex": ALiBi (or no bias) on the packed stream itself with FlexAttention: the stream is
    padded to a multiple of FLEX_BLOCK tokens (the encoder runs its whole forward on
    `padded_total` tokens; pad tokens form one extra sequence of their own), a block-sparse
    document mask built here from cu_seqlens without materialising any [T, T] mask, ALiBi as a
    `score_mod` (-slope_h * |i - j|: inside one sequence the distance of packed indices is the
    distance of positions). No [B, heads, L, L] bias, no gather/scatter. Compiled once
    (module-level, dynamic shapes) on CUDA; the same function runs eagerly on CPU (slow,
    dense math: tests only);
  * "triton": ALiBi (or no bias) on the packed stream, CUDA: our own Triton kernel
    (kernels_attention.py) walks each sequence's keys with an online softmax and adds the bias
    from in-sequence positions; no padding, no masks, q/k/v read out of the fused projection;
  * "padded": everything else (CPU, fp32, ALiBi): scatter the packed tokens into
    [B, L] slots, SDPA with a key-padding mask plus the optional ALiBi bias, gather back.
    The GEMMs around attention stay packed; only this step sees padding, and
    length-sorted packs keep it small.
`PackedAttention(backend=...)` runs the one the execution plan chose (plan.py decides, once).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .packing import positions_in_sequence, sequence_index
from .triton_support import require_runnable


@functools.lru_cache(maxsize=None)
def _varlen_attn():
    """torch's flash varlen kernel (torch >= 2.10), or None. Imported on first use: the
    import pulls in torch._dynamo, seconds of start-up that CPU processes never need."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


BACKENDS = ("flash", "padded", "flex", "triton")
FLEX_BLOCK = 128          # tokens per FlexAttention block (its default sparse block size)


_flex_attention_fn = None  # torch's flex_attention once _flex() has run (a plain global: Dynamo reads it)


@functools.lru_cache(maxsize=None)
def _flex():
    """torch.nn.attention.flex_attention (torch >= 2.5), or None; imported on first use."""
    global _flex_attention_fn
    try:
        from torch.nn.attention import flex_attention
    except ImportError:
        return None
    _flex_attention_fn = flex_attention.flex_attention
    return flex_attention


def flex_available() -> bool:
    return _flex() is not None


def _flex_packed(qkv: torch.Tensor, score_mod, block_mask) -> torch.Tensor:
    """qkv [n, block, 3, heads, d] (the fused projection of the padded stream) -> [n*block, heads*d].

    The token count enters as n * block so that, under dynamic shapes, Inductor knows it is
    a multiple of the block (no bounds checks in the kernel). q, k, v are strided views of the
    projection (no copies); the compiled kernel writes its output in q's layout, [T, heads, d]
    in memory, so the final reshape is a view too. The scale is flex_attention's default,
    1/sqrt(head_dim), a constant of the graph (a float argument would become a graph input).
    """
    n, block, _, heads, d = qkv.shape
    qkv = qkv.reshape(n * block, 3, heads, d)
    q = qkv[:, 0].transpose(0, 1).unsqueeze(0)                                  # [1, heads, T, d]
    k = qkv[:, 1].transpose(0, 1).unsqueeze(0)
    v = qkv[:, 2].transpose(0, 1).unsqueeze(0)
    out = _flex_attention_fn(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return out[0].transpose(0, 1).reshape(n * block, heads * d)


@functools.lru_cache(maxsize=None)
def _compiled_flex_packed(device_type: str):
    """`_flex_packed` through torch.compile, built once per process and device type.

    CUDA: dynamic shapes, one graph for every pack length (the block mask, the document ids and
    the ALiBi slopes are graph inputs; only a 1-block pack recompiles, 0/1 specialisation).
    CPU (tests only): static shapes, because Inductor's C++ flex template (torch 2.13) emits
    code that does not compile for a mask_mod indexing a dynamic-length buffer.
    """
    from .compiling import compile_function
    if device_type != "cuda":
        return torch.compile(_flex_packed, dynamic=False)
    compiled = compile_function(_flex_packed)

    def flex_packed(qkv: torch.Tensor, score_mod, block_mask) -> torch.Tensor:
        # Only the block count varies: the block, 3, heads and head_dim stay static, so the
        # kernel knows T = n * block is a multiple of its tile (IS_DIVISIBLE: no bounds masks).
        for dim in range(1, qkv.dim()):
            torch._dynamo.mark_static(qkv, dim)
        return compiled(qkv, score_mod, block_mask)

    return flex_packed


def document_block_mask(doc: torch.Tensor, mask_mod, block: int = FLEX_BLOCK):
    """BlockMask of "same document" attention over a stream whose `doc` ids [T_pad] are
    non-decreasing (T_pad a multiple of `block`), built from block summaries alone.

    Block i holds documents first[i]..last[i] (contiguous ids), so q-block i and kv-block j
    share a document iff those intervals overlap; the tile is full (no mask_mod needed) iff
    both blocks lie inside one and the same document. [n, n] work with n = T_pad / block,
    never [T, T] (create_block_mask would evaluate mask_mod on every pair, or need compiling).
    """
    n = doc.numel() // block
    first, last = doc[0::block], doc[block - 1::block]                          # [n] each
    overlap = (first[None, :] <= last[:, None]) & (last[None, :] >= first[:, None])   # [q, kv]
    single = first == last
    full = single[:, None] & single[None, :] & (first[:, None] == first[None, :])
    partial = overlap & ~full
    cols = torch.arange(n, device=doc.device, dtype=torch.int32)

    def ordered(m: torch.Tensor):
        # The set columns of each row first, ascending; the rest follow (never read).
        idx = torch.sort(torch.where(m, cols, cols + n), dim=-1).values % n
        return m.sum(-1, dtype=torch.int32)[None, None], idx.to(torch.int32)[None, None].contiguous()

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return _flex().BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                            mask_mod=mask_mod)


def alibi_bias(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[heads, L, L] symmetric ALiBi bias -slope_h * |i - j| (MosaicBERT / DNABERT-2)."""
    pos = torch.arange(length, device=slopes.device)
    distance = (pos[None, :] - pos[:, None]).abs().to(torch.float32)  # [L, L]
    return (-slopes.to(torch.float32)[:, None, None] * distance).to(dtype)


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and _varlen_attn() is not None)


class PackedAttention:
    """Attention for one packed batch; build once per forward, call once per layer.

    `padded_total`: the token count the encoder must run its forward on (= total except for
    "flex", which pads the stream to a multiple of FLEX_BLOCK; the caller pads its input ids
    and drops the extra rows at the end). `compile_flex`: run "flex" through torch.compile
    (None: on CUDA, where the eager fallback would materialise [T, T] scores).
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, total: int, dtype: torch.dtype,
                 alibi_slopes: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                 head_dim: Optional[int] = None, backend: str = "padded", compile_flex: Optional[bool] = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r} (one of {', '.join(BACKENDS)})")
        device = cu_seqlens.device
        if backend == "flash" and (alibi_slopes is not None or not flash_varlen_available(device, dtype)):
            raise ValueError("the flash varlen path needs CUDA, fp16/bf16 and no bias")
        if backend == "flex" and not flex_available():
            raise ValueError("the flex path needs torch.nn.attention.flex_attention (torch >= 2.5)")
        if backend == "triton":
            from . import kernels_attention
            require_runnable(device, "the triton attention path", ValueError)
            if head_dim is not None:
                kernels_attention.check_head_dim(head_dim)
            self._triton_fn = kernels_attention.alibi_varlen_attention
            # None: the kernel's plain softmax attention (no bias term at all).
            self.slopes = None if alibi_slopes is None else alibi_slopes.to(device=device, dtype=torch.float32)
        self.backend = backend
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.total = self.padded_total = total
        self.scale = scale if scale is not None or head_dim is None else 1.0 / math.sqrt(head_dim)
        if backend == "flex":
            self._init_flex(cu_seqlens, total, alibi_slopes,
                            device.type == "cuda" if compile_flex is None else compile_flex)
        elif backend == "padded":
            # Slots of L tokens per sequence; on CUDA L is rounded up to 8 so the bias rows
            # are 16-byte aligned (the memory-efficient SDPA kernel wants that).
            length = max_seqlen if device.type != "cuda" else -(-max_seqlen // 8) * 8
            batch = cu_seqlens.numel() - 1
            self.seq = sequence_index(cu_seqlens, total)                          # [T]
            self.pos = positions_in_sequence(cu_seqlens, total, self.seq)         # [T]
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

    def _init_flex(self, cu_seqlens: torch.Tensor, total: int, alibi_slopes: Optional[torch.Tensor],
                   compiled: bool) -> None:
        device = cu_seqlens.device
        block = FLEX_BLOCK
        padded = max(1, -(-total // block)) * block
        batch = cu_seqlens.numel() - 1
        # Document id of every token; the pad tokens after the last sequence are document B
        # (they attend among themselves only, so no row is empty and no NaN appears).
        doc = torch.full((padded,), batch, dtype=torch.int32, device=device)
        doc[:total] = sequence_index(cu_seqlens, total).to(torch.int32)
        self.padded_total, self.doc = padded, doc

        def same_document(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        if alibi_slopes is None:
            self.score_mod = None
        else:
            slopes = alibi_slopes.to(device=device, dtype=torch.float32)

            def alibi(score, b, h, q_idx, kv_idx):
                # Same document => |q_idx - kv_idx| is the distance of positions in the sequence.
                return score - slopes[h] * (q_idx - kv_idx).abs()

            self.score_mod = alibi
        self.block_mask = document_block_mask(doc, same_document, block)
        self._flex_fn = _compiled_flex_packed(device.type) if compiled else _flex_packed

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [T, heads, head_dim] -> [T, heads, head_dim] (T = padded_total for "flex")."""
        if self.backend == "flash":
            return self._flash(q, k, v)
        return self.attend_qkv(torch.stack((q, k, v), dim=1)).reshape(q.shape)

    def attend_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, 3, heads, head_dim] (a fused projection's output, as is) -> [T, heads, head_dim]
        ([T, heads * head_dim] for "flex"; reshape either to [T, hidden]). T = padded_total."""
        if self.backend == "flash":
            return self._flash(*qkv.unbind(1))
        total, _, heads, head_dim = qkv.shape
        if self.backend == "triton":
            return self._triton_fn(qkv, self.cu_seqlens, self.max_seqlen, self.slopes, self._scale(head_dim))
        if self.backend == "flex":
            if total != self.padded_total:
                raise ValueError(f"flex attention expects the padded stream of {self.padded_total} tokens, "
                                 f"got {total}")
            blocks = qkv.view(total // FLEX_BLOCK, FLEX_BLOCK, 3, heads, head_dim)
            if abs(self._scale(head_dim) * math.sqrt(head_dim) - 1.0) > 1e-12:
                raise ValueError("the flex path uses the default scale 1/sqrt(head_dim)")
            return self._flex_fn(blocks, self.score_mod, self.block_mask)
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
