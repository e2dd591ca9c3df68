"""Hand-written Triton kernel for the memory-bound passes of ESM-2's eager fast path.

* `add_layer_norm`: residual add and LayerNorm in one pass. In a pre-LN layer every residual add
  is followed by a LayerNorm of the sum (the layer's second norm, the next layer's first, or the
  final `emb_layer_norm_after`). ATen runs them as two passes; this reads x and y once and writes
  the sum (the residual stream) and its normalisation (faster than ATen's two passes on GPU:
  perf/RESULTS.md).
  Numerics follow the two-pass form: the sum is rounded to the stream's dtype first (as `x + y`
  would be), and the LayerNorm (fp32 math, biased variance, eps inside the root, as torch's)
  normalises that rounded sum.

  With `quant=True` (the fp8 plans, fp8.py) it writes the normalisation as e4m3 with one scale
  per row (amax / 448 of the fp32 values) instead of the dtype's: the next GEMM's input comes out
  of this pass, no separate quantization over memory.

`available(device)` says where it can run (CUDA, or any device with TRITON_INTERPRET=1: tests).
Row offsets are 64-bit (large packs of wide rows pass 2^31 values). An exact-GELU kernel lost to
ATen's and was dropped (perf/RESULTS.md).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .triton_support import can_run_on, lazy_kernel


@lazy_kernel("add_layer_norm")
def _kernel(triton, tl):
    """The jitted kernel (`_kernel()` builds it on first use)."""

    # R (rows = tokens of the pack) changes with every pack: not specialised on (as kernels_rotary).
    @triton.jit(do_not_specialize=["R"])
    def add_layer_norm_kernel(x_ptr, y_ptr, sum_ptr, out_ptr, w_ptr, b_ptr, scale_ptr, R, N, eps,
                              x_st, y_st, sum_st, out_st,
                              HAS_Y: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                              QUANT: tl.constexpr = False):
        # One program: BLOCK_R rows x all N columns (BLOCK_N >= N, masked).
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]     # [BR, 1]
        c = tl.arange(0, BLOCK_N)[None, :]                                   # [1, BN]
        col_ok = c < N
        m = (r < R) & col_ok
        v = tl.load(x_ptr + r * x_st + c, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            # The sum in fp32, rounded once to the stream's dtype (bf16 + bf16 in torch is the same);
            # the norm below is of the rounded sum.
            y = tl.load(y_ptr + r * y_st + c, mask=m, other=0.0).to(tl.float32)
            rounded = (v + y).to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + r * sum_st + c, rounded, mask=m)
            v = rounded.to(tl.float32)
        mean = tl.sum(v, axis=1)[:, None] / N
        d = tl.where(col_ok, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1)[:, None] / N + eps)
        w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
        out = d * rstd * w + b
        if QUANT:
            # e4m3 with a per-row scale (fp8.quantize_rows' rule); masked lanes hold b = 0 there.
            amax = tl.max(tl.where(col_ok, tl.abs(out), 0.0), axis=1)[:, None]
            amax = tl.maximum(amax, 1e-12)
            out = tl.minimum(tl.maximum(out * (448.0 / amax), -448.0), 448.0)   # a multiply per value, not a division
            tl.store(scale_ptr + r, amax / 448.0, mask=r < R)
        tl.store(out_ptr + r * out_st + c, out.to(out_ptr.dtype.element_ty), mask=m)

    return add_layer_norm_kernel


# Where the kernel can run (CUDA, or Triton's interpreter): triton_support's answer for all kernels.
available = can_run_on


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., N] as [R, N] with a unit last stride (a view where possible)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def add_layer_norm(x: torch.Tensor, y: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, block_rows: Optional[int] = None,
                   num_warps: Optional[int] = None, quant: bool = False) -> Tuple[torch.Tensor, object]:
    """(s, layer_norm(s)) with s = x + y, both [..., N] in x's dtype; y None: (x, layer_norm(x)).
    quant=True: the norm as fp8.Fp8Rows (e4m3 [R, N], scale [R, 1] float32) instead.

    `block_rows` and `num_warps` default to a tiling for ~4k values per program (benchmarks
    pass others: perf/bench_kernels.py).
    """
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"LayerNorm weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not match "
                         f"rows of {n}")
    if y is not None and (y.shape != x.shape or y.dtype != x.dtype):
        raise ValueError(f"y {tuple(y.shape)} {y.dtype} does not match x {tuple(x.shape)} {x.dtype}")
    kernel = _kernel()
    x2 = _rows(x)
    y2 = _rows(y) if y is not None else x2
    rows = x2.shape[0]
    total = torch.empty_like(x2) if y is not None else x2
    if quant:
        from .fp8 import E4M3, Fp8Rows
        out = torch.empty(x2.shape, dtype=E4M3, device=x2.device)
        scale = torch.empty(rows, 1, dtype=torch.float32, device=x2.device)
    else:
        out = torch.empty_like(x2)
        scale = out   # not read (QUANT=False)
    block_n = 1 << max(0, (n - 1).bit_length())
    if block_rows is None:
        block_rows = max(1, 4096 // block_n)
    if num_warps is None:
        # The e4m3 variant of one 2560-wide row per program ran 13% faster on 4 warps than on 8 (H200,
        # bench_kernels --only fp8); the bf16 one keeps the tiling it was measured best with.
        num_warps = 4 if quant and block_rows == 1 else 8 if block_rows * block_n >= 4096 else 4
    if rows:
        kernel[(-(-rows // block_rows),)](
            x2, y2, total, out, weight, bias, scale, rows, n, float(eps),
            x2.stride(0), y2.stride(0), total.stride(0), out.stride(0),
            HAS_Y=y is not None, BLOCK_R=block_rows, BLOCK_N=block_n, QUANT=quant, num_warps=num_warps)
    shape = x.shape
    stream = total.view(shape) if y is not None else x
    return stream, (Fp8Rows(out, scale) if quant else out.view(shape))
