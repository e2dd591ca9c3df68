"""FP8 (e4m3) linears: weights per output channel, activations per token, bf16 out.

The execution plan's `linears` field (plan.py) picks where these run: "native" (none: the
dtype's own GEMMs), "fp8" (every linear of the encoder), "fp8-ffn" (the feed-forward only:
ESM-2's fc1/fc2, DNABERT-S's GLU `gated_layers` and `wo`) or "fp8-smooth" (every linear, with
the LayerNorms' outlier channels moved into the next linear's weights first: `smoothing_scales`).
Everything else (attention, softmax, LayerNorms, the residual stream, rotary, pooling) stays in
the plan's dtype (bf16) or fp32.

* `quantize_weight(w)` -> `Fp8Weight(q [N, K] e4m3, scale [1, N] fp32)`: one scale per output
  channel, amax / 448, made once when the encoder follows the plan (`prepare`).
* `quantize_rows(x)` -> `Fp8Rows(q [M, K] e4m3, scale [M, 1] fp32)`: one scale per token. On the
  fast path the kernel that produces the GEMM's input writes these itself (kernels_elementwise's
  add + LayerNorm, kernels_quant's GELU): no extra pass over memory. This PyTorch form is the
  reference, the CPU path and the one Inductor fuses into a compiled layer (DNABERT-S).
* `linear_fp8(x, w, bias)` = `torch._scaled_mm` with row-wise scales: (x.q * x.scale) @ (w.q *
  w.scale)^T + bias, out bf16 (on CUDA with Hopper's fast fp8 accumulation, see there).
  `linear(x, w, b)` dispatches on the weight: an `Fp8Weight` takes this path (quantizing a bf16
  x first), a tensor `F.linear`.
* `smoothing_scales(norm, next_weights)` and `smooth(...)`: the fp8-smooth plan's per-channel
  powers of two, LayerNorm weight and bias divided, the next linears' input columns multiplied
  (a pre-LN encoder's LayerNorm output feeds only those linears, so the function is unchanged,
  and with powers of two exactly so in any float format; undone by the next plan's `prepare`).

Where FP8 GEMMs exist: CUDA compute capability >= 8.9 (Ada, Hopper). `torch._scaled_mm` also runs
on CPU (slowly; row-wise scales from torch 2.13, before that the same math in fp32 from the e4m3
values); the plan allows CPU only for tests, with EMBED_FP8_ON_CPU=1 (`support_problem`).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0            # the largest finite e4m3fn value
MIN_AMAX = 1e-12            # an all-zero row gets this amax (its scale stays finite, its values 0)
PLANS = ("fp8", "fp8-ffn", "fp8-smooth")   # RuntimeConfig.dtype values that pick them (plan.linears)
EVERY_LINEAR = ("fp8", "fp8-smooth")        # the plans with every linear in e4m3
SMOOTHED = ("fp8-smooth",)                  # the plans that smooth LayerNorm outliers into the weights
AUTO = "fp8-auto"   # RuntimeConfig.dtype: the gate picks, fastest first, the first of `candidates` that passes
DEFAULT_MIN_COSINE = 0.999   # the gate's threshold (fp8_gate.py): RuntimeConfig.fp8_min_cosine's default
CPU_FLAG = "EMBED_FP8_ON_CPU"   # test-only: "1" lets fp8 plans run on CPU (torch._scaled_mm's CPU kernel)
ALIGN = 16                  # torch._scaled_mm needs every GEMM dimension but M to be a multiple of 16


class Fp8Weight(NamedTuple):
    """A linear's weight in e4m3: q [N, K] (row-major, so q.t() is the column-major operand
    _scaled_mm wants), scale [1, N] float32 per output channel."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


class Fp8Rows(NamedTuple):
    """Activations in e4m3: q [M, K], scale [M, 1] float32 per row (token)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp(min=MIN_AMAX) / E4M3_MAX


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Clamped: x / scale can land a rounding step above 448, and e4m3fn has no infinity
    # (torch's cast makes NaN of it; the kernels' conversion saturates).
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_weight(w: torch.Tensor) -> Fp8Weight:
    """w [N, K] (any float dtype) -> Fp8Weight with scale = amax of each output row / 448."""
    scale = _scale_of(w.abs().amax(dim=1, keepdim=True))                  # [N, 1]
    return Fp8Weight(_to_e4m3(w, scale).contiguous(), scale.t().contiguous())


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """x [..., K] -> Fp8Rows of x.view(-1, K), scale = amax of each row / 448."""
    x = x.reshape(-1, x.shape[-1])
    scale = _scale_of(x.abs().amax(dim=1, keepdim=True))                  # [M, 1]
    return Fp8Rows(_to_e4m3(x, scale), scale)


def dequantize(t: Union[Fp8Weight, Fp8Rows]) -> torch.Tensor:
    """The float32 values an Fp8Weight or Fp8Rows stands for."""
    scale = t.scale.t() if isinstance(t, Fp8Weight) else t.scale
    return t.q.float() * scale


def linear_fp8(x: Fp8Rows, w: Fp8Weight, bias: Optional[torch.Tensor] = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(x.q * x.scale) @ (w.q * w.scale)^T + bias -> [M, N] in out_dtype (accumulated in fp32 on CPU,
    with fast accumulation on CUDA)."""
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    if x.q.device.type == "cpu" and not _CPU_ROWWISE.get(True, True):
        # torch < 2.13 has per-tensor scales only on CPU: the same math from the e4m3 values in fp32.
        out = (x.q.float() * x.scale) @ (w.q.float() * w.scale.t()).t()
        return (out if bias is None else out + bias.float()).to(out_dtype)
    # Fast accumulation (CUDA): Hopper's fp8 tensor cores accumulate without the periodic promotion
    # to fp32. 15-20% faster GEMMs at ESM-2 3B's shapes; the error against the fp32 product of the
    # same e4m3 operands 1.9e-3 instead of 1.7e-3 (2.9e-3 at K = 10240): small beside e4m3's own
    # rounding of the operands, and the gate measures the plan as it runs (perf/RESULTS.md).
    return torch._scaled_mm(x.q, w.q.t(), scale_a=x.scale, scale_b=w.scale, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=x.q.device.type == "cuda")


# {True: whether this torch's CPU _scaled_mm takes row-wise scales} (2.13 does; 2.11 only per-tensor),
# probed by support_problem when a plan puts fp8 on CPU: a plain dict read, so compiled code reads it too.
_CPU_ROWWISE: dict = {}


def _probe_cpu_rowwise() -> None:
    if True not in _CPU_ROWWISE:
        q = torch.ones(16, 16).to(E4M3)
        try:
            torch._scaled_mm(q, q.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                             out_dtype=torch.bfloat16)
            _CPU_ROWWISE[True] = True
        except RuntimeError:
            _CPU_ROWWISE[True] = False


def linear(x: Union[torch.Tensor, Fp8Rows], w: Union[torch.Tensor, Fp8Weight],
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, or linear_fp8 where `w` is an Fp8Weight (a tensor x is quantized per row first:
    the separate pass, only where no kernel produced Fp8Rows). A native weight takes F.linear."""
    if isinstance(w, Fp8Weight):
        rows = x if isinstance(x, Fp8Rows) else quantize_rows(x)
        out_dtype = bias.dtype if bias is not None else torch.bfloat16
        return linear_fp8(rows, w, bias, out_dtype)
    return F.linear(x, w, bias)


def plan_weights(block, linears: str, ffn: tuple) -> dict:
    """{name: Fp8Weight} of a layer's GEMMs under plan.linears `linears` (`block.linears()` names):
    every one, the feed-forward's (`ffn`), or none for "native"."""
    if linears == "native":
        return {}
    weights = block.linears()
    return quantize_linears({n: w for n, w in weights.items() if linears in EVERY_LINEAR or n in ffn})


def quantize_linears(named: dict) -> dict:
    """{name: weight tensor} -> {name: Fp8Weight}, made without autograd and outside inference mode
    (the encoder keeps them across forwards)."""
    with torch.inference_mode(False), torch.no_grad():
        return {name: quantize_weight(w.detach()) for name, w in named.items()}


def runnable_plans(encoder) -> tuple:
    """The fp8 plans an encoder (class or instance) can run, fastest first (fp8 and fp8-smooth run
    the same kernels); fp8-smooth needs a pre-LN encoder (`PRE_LAYER_NORM`): a post-LN
    LayerNorm's output is the residual stream, no linear could take the scales back."""
    return tuple(p for p in ("fp8", "fp8-smooth", "fp8-ffn") if encoder.PRE_LAYER_NORM or p not in SMOOTHED)


def candidates(encoder) -> tuple:
    """The plans fp8-auto tries on `encoder`, fastest first: every linear (smoothed where it can be:
    as fast, and it survives LayerNorm outliers that plain fp8 does not), then the feed-forward's only."""
    plans = runnable_plans(encoder)
    return tuple(p for p in plans if not (p == "fp8" and "fp8-smooth" in plans))


def support_problem(device: torch.device) -> Optional[str]:
    """Why fp8 linears cannot run on `device`, or None: CUDA compute capability >= 8.9, or CPU
    only with EMBED_FP8_ON_CPU=1 (tests: the same e4m3 math through _scaled_mm's CPU kernel)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no FP8 "
                    "tensor cores: fp8 needs compute capability >= 8.9 (Ada, Hopper or later)")
        return None
    if device.type == "cpu" and os.environ.get(CPU_FLAG) == "1":
        _probe_cpu_rowwise()
        return None
    return (f"fp8 linears need a CUDA GPU of compute capability >= 8.9, not {device.type} "
            f"(tests may set {CPU_FLAG}=1 to run the same math on CPU)")


def shape_problem(encoder: torch.nn.Module) -> Optional[str]:
    """Why the encoder's linears do not fit _scaled_mm (both dimensions multiples of 16), or None."""
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and (module.in_features % ALIGN or module.out_features % ALIGN):
            return (f"{name} is {module.in_features} -> {module.out_features}: fp8 GEMMs need both "
                    f"multiples of {ALIGN}")
    return None


def smoothing_scales(norm_weight: torch.Tensor, norm_bias: torch.Tensor, next_weights) -> torch.Tensor:
    """Per-channel powers of two that move a LayerNorm's outlier channels into the next linears'
    weights (fp8-smooth; SmoothQuant's migration, alpha 1/2, from the weights alone).

    A channel's LayerNorm output is at most about |weight| + |bias| (the normalized value is of
    order 1), its weight column's largest |w| over the next linears says how much the product
    can take: s = sqrt((|weight| + |bias|) / max |w|) balances the two, divided by its median so
    that ordinary channels keep s = 1 and only outliers move, rounded to a power of two so the
    rescaling is exact. Per-token e4m3 scales then see no channel 1e5 times the others (whose
    values would fall into subnormals: fp8_gate.with_outlier_channels)."""
    with torch.no_grad():
        reach = norm_weight.detach().abs().float() + norm_bias.detach().abs().float()
        column = torch.stack([w.detach().abs().float().amax(0) for w in next_weights]).amax(0)
        ratio = (reach.clamp(min=1e-30) / column.clamp(min=1e-30)).sqrt()
        return torch.exp2(torch.round(torch.log2(ratio / ratio.median())))


def smooth(norm_weight: torch.Tensor, norm_bias: torch.Tensor, next_weights, scales: torch.Tensor,
           undo: bool = False) -> None:
    """In place: LayerNorm weight and bias / scales, the next weights' input columns * scales
    (undo: the other way). Exact: the scales are powers of two."""
    with torch.inference_mode(False), torch.no_grad():
        factor = scales.to(norm_weight.device)
        down, up = (factor, 1 / factor) if undo else (1 / factor, factor)
        norm_weight.mul_(down.to(norm_weight.dtype))
        norm_bias.mul_(down.to(norm_bias.dtype))
        for w in next_weights:
            w.mul_(up.to(w.dtype))
