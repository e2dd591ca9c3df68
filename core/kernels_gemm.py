"""Hand-written Triton GEMMs with the GELU in their epilogue (an experiment measured on the H200).

Both models follow a GEMM with an exact (erf) GELU: ESM-2's fc1 (`gelu(x W^T + b)`, 2560 -> 10240
for the 3B) and DNABERT-S's gated MLP (`gelu(x Wg^T) * (x Wu^T)`, one [2I, H] weight, 768 -> 2 x 3072).
Eager torch writes the GEMM's output to memory and reads it back for the GELU (ESM-2: 6% of the
kernel time; DNABERT-S: GELU x gate 12-14%). cuBLASLt's GELU epilogue is the tanh approximation,
not the models' erf, so it is not used. These kernels apply the exact GELU to the accumulator
tile before it is stored:

* `linear_gelu(x, weight, bias)`  -> gelu(x @ weight.T + bias)                 [M, N]
* `linear_glu(x, weight)`         -> gelu(x @ Wg.T) * (x @ Wu.T), Wg, Wu = weight's halves  [M, N/2]

Numerics follow the eager two-pass form: the GEMM result is rounded to x's dtype (as F.linear's
output is), then the GELU is taken in fp32 of that rounded value and rounded again.

The kernel is persistent (one program per SM walks the output tiles, grouped along M so a wave
reuses weight tiles from L2) and loads its tiles with TMA descriptors (Hopper), the form of
Triton's fastest matmuls; `perf/bench_kernels.py` times its tilings against cuBLAS + ATen's GELU.
Whether the models use it is decided by that measurement (perf/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .triton_support import can_run_on, import_triton, lazy_kernel


@dataclass(frozen=True)
class GemmTiling:
    """Output tile BLOCK_M x BLOCK_N, K step BLOCK_K, pipeline stages, warps, tile grouping along M."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    warps: int = 8
    group_m: int = 8
    warp_specialize: bool = False

    def __str__(self) -> str:
        ws = " ws" if self.warp_specialize else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k} s{self.stages} w{self.warps}{ws}"


DEFAULT_TILING = GemmTiling()


@lazy_kernel
def _kernel(triton, tl):
    """The jitted kernel (`_kernel()` builds it on first use; None without triton)."""

    @triton.jit(do_not_specialize=["M"])
    def gemm_gelu_kernel(a_desc, b_desc, c_desc, bias_ptr, M, N_OUT, K, UP_ROW, PROGRAMS,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
                         PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
        # a [M, K], b (nn.Linear weight) [rows, K], c [M, N_OUT]. GLU: the up projection's rows start
        # at UP_ROW of b, and c = gelu(a b_gate^T) * (a b_up^T).
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N_OUT, BLOCK_N)
        steps = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True,
                             warp_specialize=WARP_SPECIALIZE):
            # Tiles numbered in groups of GROUP_M rows of tiles, column by column inside a group:
            # the programs running at once share few weight (N) tiles, which then stay in L2.
            first_m = (tile // (GROUP_M * tiles_n)) * GROUP_M
            group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
            in_group = tile % (GROUP_M * tiles_n)
            pm, pn = first_m + in_group % group_rows, in_group // group_rows
            row, col = pm * BLOCK_M, pn * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if GLU:
                up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for step in range(steps):
                k = step * BLOCK_K
                a = a_desc.load([row, k])
                acc = tl.dot(a, b_desc.load([col, k]).T, acc, input_precision=PRECISION)
                if GLU:
                    up = tl.dot(a, b_desc.load([UP_ROW + col, k]).T, up, input_precision=PRECISION)
            if HAS_BIAS:
                cols = col + tl.arange(0, BLOCK_N)
                acc += tl.load(bias_ptr + cols, mask=cols < N_OUT, other=0.0).to(tl.float32)[None, :]
            dtype = c_desc.dtype
            v = acc.to(dtype).to(tl.float32)                     # rounded as F.linear's output is
            out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))   # exact (erf) GELU
            if GLU:
                out = out.to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
            c_desc.store([row, col], out.to(dtype))

    return gemm_gelu_kernel


# Where the kernel can run (CUDA, or Triton's interpreter): triton_support's answer for all kernels.
available = can_run_on


def _programs(device: torch.device, tiles: int) -> int:
    """Persistent programs: one per SM (the interpreter runs every tile in one program's loop)."""
    if device.type != "cuda":
        return max(1, min(tiles, 4))
    return max(1, min(tiles, torch.cuda.get_device_properties(device).multi_processor_count))


def _gemm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], glu: bool,
               tiling: Optional[GemmTiling]) -> torch.Tensor:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the triton GEMM kernels need the triton package")
    from triton.tools.tensor_descriptor import TensorDescriptor
    tiling = tiling or DEFAULT_TILING
    k = x.shape[-1]
    rows_w, k_w = weight.shape
    if k_w != k or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not take x [..., {k}] {x.dtype}")
    if glu and rows_w % 2:
        raise ValueError(f"a gated weight has an even number of rows (gate, then up), got {rows_w}")
    n_out = rows_w // 2 if glu else rows_w
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias {tuple(bias.shape)} does not match {n_out} outputs")
    a = x.reshape(-1, k)
    a = a if a.is_contiguous() else a.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    m = a.shape[0]
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m:
        t = tiling
        tiles = -(-m // t.block_m) * -(-n_out // t.block_n)
        programs = _programs(x.device, tiles)
        a_desc = TensorDescriptor.from_tensor(a, [t.block_m, t.block_k])
        b_desc = TensorDescriptor.from_tensor(w, [t.block_n, t.block_k])
        c_desc = TensorDescriptor.from_tensor(out, [t.block_m, t.block_n])
        precision = "ieee" if x.dtype == torch.float32 else "tf32"    # fp32: exact, not tf32
        kernel[(programs,)](a_desc, b_desc, c_desc, bias if bias is not None else out, m, n_out, k,
                            n_out, programs, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                            GROUP_M=t.group_m, HAS_BIAS=bias is not None, GLU=glu, PRECISION=precision,
                            WARP_SPECIALIZE=t.warp_specialize, num_stages=t.stages, num_warps=t.warps)
    return out.view(*x.shape[:-1], n_out)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                tiling: Optional[GemmTiling] = None) -> torch.Tensor:
    """gelu_erf(x @ weight.T + bias): x [..., K], weight [N, K] (nn.Linear's) -> [..., N] in x's dtype."""
    return _gemm_gelu(x, weight, bias, glu=False, tiling=tiling)


def linear_glu(x: torch.Tensor, weight: torch.Tensor, tiling: Optional[GemmTiling] = None) -> torch.Tensor:
    """gelu_erf(x @ Wg.T) * (x @ Wu.T): x [..., K], weight [2I, K] = [Wg; Wu] -> [..., I] in x's dtype."""
    return _gemm_gelu(x, weight, None, glu=True, tiling=tiling)


def tma_capable(device) -> bool:
    """TMA descriptors need compute capability 9.0 (Hopper) or newer; the interpreter takes them anywhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return can_run_on(device)
    return import_triton() is not None and torch.cuda.get_device_capability(device) >= (9, 0)
