"""Hand-written Triton kernel: variable-length self-attention with ALiBi on a packed stream.

DNABERT-S (MosaicBERT) adds a symmetric ALiBi bias, -slope_h * |i - j|, to every score.
torch's flash varlen kernel takes no bias, SDPA with a bias runs on padded [B, L] slots, and
FlexAttention over the packed stream evaluates a document mask in every 128-token block that
straddles two sequences (nearly all of them, for ~95-token DNA chunks). This kernel walks the
sequences themselves: one program per (sequence, head, block of BLOCK_M queries) loops over
its own sequence's keys in BLOCK_N steps with an online softmax (the flash-attention
recurrence), adds the bias from in-sequence positions, and reads q, k and v straight out of
the fused projection [T, 3, heads, head_dim] (no copies, no padding, no mask tensors).

Math per sequence, per head (fp32 accumulation, inputs in their own dtype):
    out = softmax(q k^T * scale - slope * |i - j|) v

Never imported by default: `triton` is optional (the test extra has it). `available(device)` says whether
the kernel can run there (CUDA, or any device with TRITON_INTERPRET=1: tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from .triton_support import can_run_on, lazy_kernel

# Tiling (queries per program, keys per step of the inner loop, warps), with and without a bias:
# the fastest of perf/bench_kernels.py's sweep for both models' lengths (figures in perf/RESULTS.md).
TILINGS = {True: (64, 32, 4), False: (64, 32, 4)}
LOG2E = 1.4426950408889634


@lazy_kernel("alibi_varlen_attention")
def _kernel(triton, tl):
    """The jitted kernel (`_kernel()` builds it on first use)."""

    @triton.jit
    def alibi_varlen_kernel(qkv_ptr, out_ptr, cu_ptr, slopes_ptr, qk_scale, heads,
                            stride_t, stride_w, stride_h, out_st, out_sh,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        # Program (sequence * heads + head, query block). Scores live in the log2 domain:
        # qk_scale and the slope carry a factor log2(e), so exp2 gives exp.
        pid = tl.program_id(0)
        seq = pid // heads
        head = pid % heads
        start = tl.load(cu_ptr + seq)
        length = tl.load(cu_ptr + seq + 1) - start
        m_lo = tl.program_id(1) * BLOCK_M
        if m_lo < length:  # short sequences need fewer query blocks than the grid has
            offs_m = m_lo + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, HEAD_DIM)
            m_ok = offs_m < length
            q_rows = (start + offs_m).to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :]
            q = tl.load(qkv_ptr + q_rows, mask=m_ok[:, None], other=0.0)
            if HAS_BIAS:
                slope = tl.load(slopes_ptr + head) * 1.4426950408889634
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            for n_lo in range(0, length, BLOCK_N):
                offs_n = n_lo + tl.arange(0, BLOCK_N)
                n_ok = offs_n < length
                kv_rows = (start + offs_n).to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :]
                k = tl.load(qkv_ptr + stride_w + kv_rows, mask=n_ok[:, None], other=0.0)
                v = tl.load(qkv_ptr + 2 * stride_w + kv_rows, mask=n_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                if HAS_BIAS:
                    s -= slope * tl.abs(offs_m[:, None] - offs_n[None, :]).to(tl.float32)
                s = tl.where(n_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))   # finite: every step holds >= 1 real key
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
            acc = acc / l_i[:, None]
            o_rows = (start + offs_m).to(tl.int64)[:, None] * out_st + head * out_sh + offs_d[None, :]
            tl.store(out_ptr + o_rows, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])

    return alibi_varlen_kernel


# Where the kernel can run (CUDA, or Triton's interpreter): triton_support's answer for all kernels.
available = can_run_on


def supports(head_dim: int) -> bool:
    """The kernel's tiles need a power-of-2 head_dim of at least 16 (the matrix units' minimum)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def check_head_dim(head_dim: int) -> None:
    if not supports(head_dim):
        raise ValueError(f"the triton attention kernel needs a power-of-2 head_dim >= 16, got {head_dim}")


def alibi_varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                           slopes: Optional[torch.Tensor], scale: float, block_m: Optional[int] = None,
                           block_n: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """qkv [T, 3, heads, head_dim] (packed; sequences marked by cu_seqlens [B+1] int32) ->
    [T, heads, head_dim] in qkv's dtype: per sequence softmax(q k^T * scale - slope_h |i-j|) v.

    `slopes` [heads] float32 on qkv's device, or None: no bias (plain softmax attention, ESM-2).
    Tokens attend only inside their own sequence. block_m, block_n, num_warps: the tiling, default
    the module's TILINGS for a bias or none (perf/bench_kernels.py times the choices).
    """
    default_m, default_n, default_warps = TILINGS[slopes is not None]
    block_m, block_n = block_m or default_m, block_n or default_n
    num_warps = num_warps or default_warps
    kernel = _kernel()
    total, three, heads, head_dim = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must be [T, 3, heads, head_dim], got {tuple(qkv.shape)}")
    check_head_dim(head_dim)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = torch.empty(total, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0:
        return out
    precision = "ieee" if qkv.dtype == torch.float32 else "tf32"   # fp32: exact, not tf32
    grid = (batch * heads, -(-max_seqlen // block_m))
    if slopes is not None and slopes.numel() != heads:
        raise ValueError(f"{slopes.numel()} ALiBi slopes for {heads} heads")
    slopes_arg = slopes.to(torch.float32) if slopes is not None else out   # without a bias: never read
    kernel[grid](qkv, out, cu_seqlens, slopes_arg, scale * LOG2E, heads,
                 qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1),
                 HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=slopes is not None,
                 PRECISION=precision, num_warps=num_warps)
    return out
