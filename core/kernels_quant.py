"""Hand-written Triton kernel for the fp8 plans (fp8.py): rows to e4m3 with one scale per row.

* `quantize_rows(x)`: x [R, N] -> fp8.Fp8Rows (e4m3 [R, N], scale [R, 1] = amax / 448 in fp32),
  fp8.quantize_rows in one pass (read once, write a quarter as many bytes as bf16 would).
* `gelu_quantize_rows(x)`: the same of exact (erf) GELU(x), GELU in fp32: ESM-2's fc1 -> fc2 step,
  the GELU and the quantization of fc2's input in the one pass the GELU needed anyway.
* `glu_quantize_rows(g)`: the same of GELU(g[:, :I]) * g[:, I:]: DNABERT-S's GLU before `wo`.

Rows up to 4096 values: a program holds whole rows (BLOCK_N >= N, masked), as kernels_elementwise's
add + LayerNorm. Longer rows (ESM-2 3B's 10240-wide fc1 output): BLOCK_R rows per program in
BLOCK_N chunks, two passes (the amax, then scale and store), the row width a compile-time constant
so both chunk loops unroll and every chunk's load is in flight at once (a loop over a run-time width
waited for each load: perf/RESULTS.md). Values are scaled by the reciprocal 448 / amax (a multiply,
not a division per value). Row offsets are 64-bit. `Launch` holds the block shape; bench_quant.py
sweeps it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .triton_support import can_run_on, lazy_kernel

available = can_run_on


CHUNKED_ABOVE = 4096
GELU_MIN_ABS = 0.17   # |min GELU| = 0.16997 (at x = -0.7518): the largest |GELU| of any x <= 0


class Launch(NamedTuple):
    """How a row width is cut: BLOCK_R rows per program, BLOCK_N values per chunk, num_warps."""

    rows: int
    chunk: int
    warps: int


def default_launch(n: int) -> Launch:
    """Whole rows (up to CHUNKED_ABOVE values, 4096 values per program; one row of more than 2048
    on 4 warps), longer ones one row per program in 2048-value chunks on 8: the fastest of
    bench_kernels --only fp8's sweep on an H200 (perf/RESULTS.md)."""
    if n > CHUNKED_ABOVE:
        return Launch(1, 2048, 8)
    block_n = 1 << max(0, (n - 1).bit_length())
    rows = max(1, 4096 // block_n)
    return Launch(rows, block_n, 8 if rows > 1 and rows * block_n >= 4096 else 4)


@lazy_kernel("quantize_rows")
def _kernel(triton, tl):
    """The jitted kernel (`_kernel()` builds it on first use)."""

    @triton.jit(do_not_specialize=["R"])
    def quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, R, x_st, out_st, N: tl.constexpr, ACT: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]     # [BR, 1]
        c = tl.arange(0, BLOCK_N)[None, :]                                   # [1, BN]
        row_ok = r < R
        # GELU below is exact (erf): 0.5 v (1 + erf(v / sqrt 2)), gelu(0) = 0; written out at each use
        # (a shared @triton.jit helper fails under the interpreter the CPU tests use).
        if N <= BLOCK_N:
            # Whole rows: one read, one write.
            m = row_ok & (c < N)
            v = tl.load(x_ptr + r * x_st + c, mask=m, other=0.0).to(tl.float32)
            if ACT > 0:
                v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
            if ACT == 2:   # GLU: times the gate, the row's second half
                v *= tl.load(x_ptr + r * x_st + N + c, mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(v), axis=1)[:, None], 1e-12)
        else:
            # Chunks, first pass: the amax. GELU rises from its minimum (-0.16997 at -0.7518) on, so
            # a row's largest |GELU| is GELU(its largest value) or at most 0.17: that pass needs the
            # max of x alone, no erf (the scale may then cover up to 0.17 more than the row needs).
            top = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
            if ACT == 1:
                top -= 3.0e38
            for start in tl.static_range(0, N, BLOCK_N):
                m = row_ok & (start + c < N)
                if ACT == 1:
                    v = tl.load(x_ptr + r * x_st + start + c, mask=m, other=-3.0e38).to(tl.float32)
                    top = tl.maximum(top, v)
                else:
                    v = tl.load(x_ptr + r * x_st + start + c, mask=m, other=0.0).to(tl.float32)
                    if ACT == 2:
                        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
                        v *= tl.load(x_ptr + r * x_st + N + start + c, mask=m, other=0.0).to(tl.float32)
                    top = tl.maximum(top, tl.abs(v))
            amax = tl.max(top, axis=1)[:, None]
            if ACT == 1:
                amax = tl.maximum(0.5 * amax * (1.0 + tl.math.erf(amax * 0.7071067811865476)), 0.17)   # GELU_MIN_ABS
            amax = tl.maximum(amax, 1e-12)
        inv = 448.0 / amax
        tl.store(scale_ptr + r, amax / 448.0, mask=row_ok)
        if N <= BLOCK_N:
            q = tl.minimum(tl.maximum(v * inv, -448.0), 448.0)
            tl.store(out_ptr + r * out_st + c, q.to(out_ptr.dtype.element_ty), mask=m)
        else:
            # Second pass: the values again (from L2; GELU recomputed), scaled and stored.
            for start in tl.static_range(0, N, BLOCK_N):
                m = row_ok & (start + c < N)
                v = tl.load(x_ptr + r * x_st + start + c, mask=m, other=0.0).to(tl.float32)
                if ACT > 0:
                    v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
                if ACT == 2:
                    v *= tl.load(x_ptr + r * x_st + N + start + c, mask=m, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(v * inv, -448.0), 448.0)
                tl.store(out_ptr + r * out_st + start + c, q.to(out_ptr.dtype.element_ty), mask=m)

    return quantize_rows_kernel


def _launch(x: torch.Tensor, act: int, launch: Optional[Launch] = None):
    from .fp8 import E4M3, Fp8Rows
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape
    n = n // 2 if act == 2 else n
    out = torch.empty((rows, n), dtype=E4M3, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block_rows, block_n, num_warps = launch or default_launch(n)
    if rows:
        _kernel()[(-(-rows // block_rows),)](x2, out, scale, rows, x2.stride(0), out.stride(0), N=n, ACT=act,
                                             BLOCK_R=block_rows, BLOCK_N=block_n, num_warps=num_warps)
    return Fp8Rows(out, scale)


def quantize_rows(x: torch.Tensor, launch: Optional[Launch] = None):
    """x [..., N] -> fp8.Fp8Rows of x.view(-1, N) (fp8.quantize_rows in one kernel)."""
    return _launch(x, 0, launch)


def gelu_quantize_rows(x: torch.Tensor, launch: Optional[Launch] = None):
    """x [..., N] -> fp8.Fp8Rows of exact GELU(x) computed in fp32."""
    return _launch(x, 1, launch)


def glu_quantize_rows(g: torch.Tensor, launch: Optional[Launch] = None):
    """g [..., 2I] -> fp8.Fp8Rows of GELU(g[:, :I]) * g[:, I:] in fp32 (DNABERT-S's GLU, exact GELU)."""
    return _launch(g, 2, launch)
