"""The steps a plan binds into ESM-2's one layer definition (esm2.layer_tail): add + LayerNorm, the
activation between fc1 and fc2, and what the attention output becomes before the out-projection.

`layer_steps(plan, last)` picks them once, in `ESM2.prepare`, from the execution plan:

| plan.linears | norm before fc1 | fc1 -> fc2 | attention out -> out-proj | norm before the next q/k/v |
|---|---|---|---|---|
| native  | add + LN (dtype)     | GELU (dtype)         | as is                | add + LN (dtype) |
| fp8-ffn | add + LN -> e4m3     | GELU -> e4m3         | as is                | add + LN (dtype) |
| fp8, fp8-smooth | add + LN -> e4m3 | GELU -> e4m3      | quantize pass        | add + LN -> e4m3 (not after the last layer: the output) |

"-> e4m3" is fp8.Fp8Rows (per-token scales), written by the kernel that computes the step when the
plan runs our kernels (kernels_elementwise's add + LayerNorm with quant=True, kernels_quant's GELU),
else by fp8.quantize_rows after the PyTorch step. The attention output has no producer of ours
that could quantize it, hence the one separate pass (kernels_quant.quantize_rows).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import fp8
from .plan import ExecutionPlan


def add_norm_torch(x: torch.Tensor, y: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + y, LayerNorm(x + y)); y None: (x, LayerNorm(x))."""
    if y is not None:
        x = x + y
    return x, F.layer_norm(x, weight.shape, weight, bias, eps)


def add_norm_triton(x, y, weight, bias, eps):
    """add_norm_torch as one kernels_elementwise pass (the residual add fused into the LayerNorm)."""
    from .kernels_elementwise import add_layer_norm
    return add_layer_norm(x, y, weight, bias, eps)


def add_norm_torch_fp8(x, y, weight, bias, eps) -> Tuple[torch.Tensor, fp8.Fp8Rows]:
    """(x + y, the LayerNorm in fp32 quantized per row): the kernel's numerics in PyTorch."""
    if y is not None:
        x = x + y
    h = F.layer_norm(x.float(), weight.shape, weight.float(), bias.float(), eps)
    return x, fp8.quantize_rows(h)


def add_norm_triton_fp8(x, y, weight, bias, eps):
    """add_norm_torch_fp8 as one kernels_elementwise pass (add, LayerNorm, amax, e4m3 store)."""
    from .kernels_elementwise import add_layer_norm
    return add_layer_norm(x, y, weight, bias, eps, quant=True)


def gelu_fp8_torch(x: torch.Tensor) -> fp8.Fp8Rows:
    """Exact GELU in fp32, quantized per row."""
    return fp8.quantize_rows(F.gelu(x.float()))


def gelu_fp8_triton(x: torch.Tensor) -> fp8.Fp8Rows:
    from .kernels_quant import gelu_quantize_rows
    return gelu_quantize_rows(x)


def quantize_triton(x: torch.Tensor) -> fp8.Fp8Rows:
    from .kernels_quant import quantize_rows
    return quantize_rows(x)


def as_is(x):
    return x


class LayerSteps(NamedTuple):
    """What esm2.layer_tail calls between its GEMMs (see the module docstring)."""

    norm_mid: Callable    # residual add + the LayerNorm before fc1
    act: Callable         # fc1's output -> fc2's input
    out_in: Callable      # the attention output -> the out-projection's input
    norm_next: Callable   # residual add + the next LayerNorm (the next layer's first, or the final one)


def first_norm(plan: ExecutionPlan) -> Callable:
    """The add + LayerNorm before the first layer's q/k/v GEMM."""
    if plan.linears in fp8.EVERY_LINEAR:
        return add_norm_triton_fp8 if plan.kernels else add_norm_torch_fp8
    return add_norm_triton if plan.kernels else add_norm_torch


def layer_steps(plan: ExecutionPlan, last: bool) -> LayerSteps:
    """The steps of a layer under `plan`; `last`: the final layer (its output norm stays in the dtype)."""
    add_norm = add_norm_triton if plan.kernels else add_norm_torch
    if plan.linears == "native":
        return LayerSteps(add_norm, F.gelu, as_is, add_norm)
    add_norm_q = add_norm_triton_fp8 if plan.kernels else add_norm_torch_fp8
    act = gelu_fp8_triton if plan.kernels else gelu_fp8_torch
    every = plan.linears in fp8.EVERY_LINEAR
    out_in = (quantize_triton if plan.kernels else fp8.quantize_rows) if every else as_is
    return LayerSteps(add_norm_q, act, out_in, add_norm_q if every and not last else add_norm)
