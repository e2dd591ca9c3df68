"""Hand-written Triton kernel for the fp8 plans (fp8.py): rows to e4m3 with one scale per row.

* `quantize_rows(x)`: x [R, N] -> fp8.Fp8Rows (e4m3 [R, N], scale [R, 1] = amax / 448 in fp32),
  fp8.quantize_rows in one pass (read once, write a quarter as many bytes as bf16 would).
* `gelu_quantize_rows(x)`: the same of exact (erf) GELU(x), GELU in fp32: ESM-2's fc1 -> fc2 step,
  the GELU and the quantization of fc2's input in the one pass the GELU needed anyway.
* `glu_quantize_rows(g)`: the same of GELU(g[:, :I]) * g[:, I:]: DNABERT-S's GLU before `wo`.

Rows up to 4096 values: one program holds whole rows (BLOCK_N >= N, masked), as
kernels_elementwise's add + LayerNorm. Longer rows (ESM-2 3B's 10240-wide fc1 output): one row per
program in 1024-value chunks, two passes (amax, then scale and store). Row offsets are 64-bit.
"""
from __future__ import annotations

import torch

from .triton_support import can_run_on, lazy_kernel

available = can_run_on


CHUNK = 1024          # rows longer than CHUNKED_ABOVE are read in chunks of this many values
CHUNKED_ABOVE = 4096
GELU_MIN_ABS = 0.17   # |min GELU| = 0.16997 (at x = -0.7518): the largest |GELU| of any x <= 0


@lazy_kernel("quantize_rows")
def _kernel(triton, tl):
    """The jitted kernel (`_kernel()` builds it on first use)."""

    @triton.jit(do_not_specialize=["R"])
    def quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, R, N, x_st, out_st, ACT: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr):
        if CHUNKED:
            # One row per program in BLOCK_N chunks, two passes: the amax, then the values again
            # (from L2; GELU recomputed) scaled and stored. Holding a 10k-wide row in registers
            # measured 2.3x slower than ATen's GELU (perf/RESULTS.md).
            r = tl.program_id(0).to(tl.int64)
            c = tl.arange(0, BLOCK_N)
            if ACT == 1:
                # GELU rises from its minimum (-0.16997 at -0.7518) on, so the row's largest |GELU|
                # is GELU(its largest value) or at most 0.17: the first pass needs only the max
                # of x, no erf (the scale may then cover up to 0.17 more than the row needs).
                top = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    v = tl.load(x_ptr + r * x_st + start + c, mask=start + c < N, other=-3.0e38).to(tl.float32)
                    top = tl.maximum(top, v)
                vmax = tl.max(top, axis=0)
                amax = tl.maximum(0.5 * vmax * (1.0 + tl.math.erf(vmax * 0.7071067811865476)), 0.17)   # GELU_MIN_ABS
            else:
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    v = tl.load(x_ptr + r * x_st + start + c, mask=start + c < N, other=0.0).to(tl.float32)
                    if ACT == 2:
                        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))   # exact GELU; gelu(0) = 0
                        v *= tl.load(x_ptr + r * x_st + N + start + c, mask=start + c < N, other=0.0).to(tl.float32)
                    acc = tl.maximum(acc, tl.abs(v))
                amax = tl.max(acc, axis=0)
            scale = tl.maximum(amax, 1e-12) / 448.0
            for start in range(0, N, BLOCK_N):
                m = start + c < N
                v = tl.load(x_ptr + r * x_st + start + c, mask=m, other=0.0).to(tl.float32)
                if ACT > 0:
                    v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
                if ACT == 2:
                    v *= tl.load(x_ptr + r * x_st + N + start + c, mask=m, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(v / scale, -448.0), 448.0)
                tl.store(out_ptr + r * out_st + start + c, q.to(out_ptr.dtype.element_ty), mask=m)
            tl.store(scale_ptr + r, scale)
        else:
            # BLOCK_R whole rows per program (BLOCK_N >= N, masked).
            r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]     # [BR, 1]
            c = tl.arange(0, BLOCK_N)[None, :]                                   # [1, BN]
            m = (r < R) & (c < N)
            v = tl.load(x_ptr + r * x_st + c, mask=m, other=0.0).to(tl.float32)
            if ACT > 0:
                v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
            if ACT == 2:   # GLU: times the gate, the row's second half
                v *= tl.load(x_ptr + r * x_st + N + c, mask=m, other=0.0).to(tl.float32)

            amax = tl.max(tl.abs(v), axis=1)[:, None]
            scale = tl.maximum(amax, 1e-12) / 448.0
            q = tl.minimum(tl.maximum(v / scale, -448.0), 448.0)
            tl.store(out_ptr + r * out_st + c, q.to(out_ptr.dtype.element_ty), mask=m)
            tl.store(scale_ptr + r, scale, mask=r < R)

    return quantize_rows_kernel


def _launch(x: torch.Tensor, act: int):
    from .fp8 import E4M3, Fp8Rows
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape
    n = n // 2 if act == 2 else n
    out = torch.empty((rows, n), dtype=E4M3, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    chunked = n > CHUNKED_ABOVE
    block_n = CHUNK if chunked else 1 << max(0, (n - 1).bit_length())
    block_rows = 1 if chunked else max(1, 4096 // block_n)
    num_warps = 4 if chunked else 8 if block_rows * block_n >= 4096 else 4
    if rows:
        _kernel()[(-(-rows // block_rows),)](x2, out, scale, rows, n, x2.stride(0), out.stride(0), ACT=act,
                                             BLOCK_R=block_rows, BLOCK_N=block_n, CHUNKED=chunked,
                                             num_warps=num_warps)
    return Fp8Rows(out, scale)


def quantize_rows(x: torch.Tensor):
    """x [..., N] -> fp8.Fp8Rows of x.view(-1, N) (fp8.quantize_rows in one kernel)."""
    return _launch(x, 0)


def gelu_quantize_rows(x: torch.Tensor):
    """x [..., N] -> fp8.Fp8Rows of exact GELU(x) computed in fp32."""
    return _launch(x, 1)


def glu_quantize_rows(g: torch.Tensor):
    """g [..., 2I] -> fp8.Fp8Rows of GELU(g[:, :I]) * g[:, I:] in fp32 (DNABERT-S's GLU, exact GELU)."""
    return _launch(g, 2)
