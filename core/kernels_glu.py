"""Hand-written Triton kernel: DNABERT-S's gated-linear-unit projection with its activation fused.

MosaicBERT's MLP computes g = h W^T ([T, 2I], no bias), then gelu(g[:, :I]) * g[:, I:]. As
cuBLAS GEMM + one fused element-wise pass, the [T, 2I] product goes to memory and back (at
HBM bandwidth that pass alone took 12-14% of DNABERT-S's time on an H200). Here one program
computes the same output tile from both halves of W at once (two accumulators over the same
rows of h), applies exact (erf) GELU and the gate in registers, and writes only [T, I].

The accumulators stay in fp32 up to the product, one rounding fewer than the unfused path
(which rounds g to bf16 first).

Never imported by default: `triton` is optional (CI has none). `available(device)` says whether
the kernel can run there (CUDA, or any device with TRITON_INTERPRET=1: tests).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch


class GluTiling(NamedTuple):
    """Output tile (block_m rows x block_n gated columns), K step, launch shape."""
    block_m: int = 128
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8      # row blocks that sweep the columns together (L2 reuse of h)
    num_warps: int = 8
    num_stages: int = 3


TILING = GluTiling()


@functools.lru_cache(maxsize=None)
def _kernel():
    """The jitted kernel, or None without triton (imported on first use only)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def glu_gelu_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
        # out[m, n] = gelu(sum_k x[m, k] w[n, k]) * sum_k x[m, k] w[N + n, k]; K % BLOCK_K == 0,
        # N % BLOCK_N == 0 (checked by the caller), rows beyond M masked.
        pid = tl.program_id(0)
        blocks_m = tl.cdiv(M, BLOCK_M)
        blocks_n = N // BLOCK_N
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        gate_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]          # [BLOCK_N, BLOCK_K]
        value_ptrs = gate_ptrs + N * stride_wn
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_value = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for _ in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            acc_gate = tl.dot(x, tl.trans(tl.load(gate_ptrs)), acc_gate, input_precision=PRECISION)
            acc_value = tl.dot(x, tl.trans(tl.load(value_ptrs)), acc_value, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            value_ptrs += BLOCK_K
        gelu = 0.5 * acc_gate * (1.0 + tl.math.erf(acc_gate * 0.7071067811865476))
        out = gelu * acc_value
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])

    return glu_gelu_kernel


def triton_importable() -> bool:
    return _kernel() is not None


def available(device) -> bool:
    """Whether `glu_gelu` can run on `device`: triton importable and CUDA (or the interpreter)."""
    device = torch.device(device)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpret) and triton_importable()


def supports(hidden: int, intermediate: int, tiling: GluTiling = TILING) -> bool:
    """Whether the kernel's tiles divide these sizes (else the caller keeps the torch path)."""
    return hidden % tiling.block_k == 0 and intermediate % tiling.block_n == 0


def glu_gelu(x: torch.Tensor, weight: torch.Tensor, tiling: GluTiling = TILING) -> torch.Tensor:
    """x [T, H], weight [2I, H] (MosaicBERT's gated_layers, no bias) -> gelu(x Wg^T) * (x Wv^T), [T, I]
    in x's dtype; Wg = weight[:I], Wv = weight[I:]."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the triton GLU kernel needs the triton package")
    total, hidden = x.shape
    two_inter, w_hidden = weight.shape
    inter = two_inter // 2
    if w_hidden != hidden or two_inter % 2:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}: expected [2I, {hidden}]")
    if not supports(hidden, inter, tiling):
        raise ValueError(f"the triton GLU kernel needs hidden % {tiling.block_k} == 0 and "
                         f"intermediate % {tiling.block_n} == 0, got {hidden}, {inter}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty(total, inter, dtype=x.dtype, device=x.device)
    if total == 0:
        return out
    precision = "ieee" if x.dtype == torch.float32 else "tf32"   # fp32: exact, not tf32
    grid = (-(-total // tiling.block_m) * (inter // tiling.block_n),)
    kernel[grid](x, weight, out, total, inter, hidden, x.stride(0), weight.stride(0), out.stride(0),
                 BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k, GROUP_M=tiling.group_m,
                 PRECISION=precision, num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    return out
