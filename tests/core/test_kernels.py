"""Our Triton kernels (core/kernels_*.py) run directly against float64 references written here
from the formulas (no project code in the expectations): on CPU under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 where CUDA is absent), and on CUDA where present.

Sizes are small (the interpreter runs every program in Python) but cross every edge the kernels
have: several sequences of different lengths in one pack, sequences longer than a tile and not a
multiple of it, a single token, head counts and widths that are not powers of two (masked lanes),
strided views. A flipped sign or a swapped index in any kernel fails here.

Needs the `triton` package (the test extra pins it; Linux only): skipped, saying so, without it.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed (the test extra has it, "
                                     "on Linux with Python >= 3.10): our kernels cannot run")

from embed_core import kernels_attention, kernels_elementwise, kernels_rotary  # noqa: E402

KERNEL_MODULES = (kernels_attention, kernels_rotary, kernels_elementwise)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("our kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA; "
                "it was set to something else)", allow_module_level=True)

pytestmark = pytest.mark.parametrize("device", DEVICES)


def randn(*shape, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def test_the_kernels_run_here(device):
    """On CPU: interpreted (a kernel built without the interpreter could not launch at all)."""
    for module in KERNEL_MODULES:
        assert module.available(device)
        if device == "cpu":
            assert type(module._kernel()).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------- varlen attention


def reference_attention(qkv: torch.Tensor, lengths, slopes, scale: float) -> torch.Tensor:
    """float64 on CPU, per sequence and head: softmax_j(scale * q_i.k_j - slope_h * |i - j|) @ v."""
    qkv = qkv.cpu().double()
    out = torch.zeros(qkv.shape[0], qkv.shape[2], qkv.shape[3], dtype=torch.float64)
    start = 0
    for n in lengths:
        q, k, v = qkv[start:start + n, 0], qkv[start:start + n, 1], qkv[start:start + n, 2]   # [n, H, D]
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale
        if slopes is not None:
            i = torch.arange(n, dtype=torch.float64)
            scores = scores - slopes.cpu().double()[:, None, None] * (i[:, None] - i[None, :]).abs()
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        out[start:start + n] = torch.einsum("hij,jhd->ihd", weights, v)
        start += n
    return out


# (lengths, heads, head_dim, ALiBi, tiles (block_m, block_n) or None for the module's own, dtype,
#  strided: qkv a view into a wider buffer (other strides for tokens, q/k/v and heads)).
# 16x16 tiles give short sequences several query blocks and key steps; None is the production tiling.
ATTENTION_CASES = {
    "alibi-d16-tiles16": ([1, 16, 17, 40, 3], 3, 16, True, (16, 16), torch.float32, False),
    "alibi-d64-default-strided": ([70, 1, 33], 2, 64, True, None, torch.float32, True),
    "alibi-d32-fp16": ([20, 37, 2], 2, 32, True, (16, 16), torch.float16, False),
    "plain-d32-tiles16-strided": ([5, 40, 1, 23], 2, 32, False, (16, 16), torch.float32, True),
    "plain-d64-default": ([70, 9], 2, 64, False, None, torch.float32, False),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_varlen_attention_equals_reference(case, device):
    lengths, heads, head_dim, alibi, tiles, dtype, strided = ATTENTION_CASES[case]
    total = sum(lengths)
    if strided:   # [T, 3, heads, head_dim] out of [T, 4, heads + 1, head_dim]
        qkv = randn(total, 4, heads + 1, head_dim, seed=total, dtype=dtype, device=device)[:, :3, :heads]
    else:
        qkv = randn(total, 3, heads, head_dim, seed=total, dtype=dtype, device=device)
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32,
                      device=device)
    # Distinct slopes per head, strong enough that the bias decides where attention goes.
    slopes = torch.tensor([0.5 / 2 ** h for h in range(heads)], device=device) if alibi else None
    scale = 0.7 / math.sqrt(head_dim)
    block_m, block_n = tiles or (None, None)
    before = qkv.clone()
    out = kernels_attention.alibi_varlen_attention(qkv, cu, max(lengths), slopes, scale,
                                                   block_m=block_m, block_n=block_n)
    assert out.shape == (total, heads, head_dim) and out.dtype == dtype
    assert torch.equal(qkv, before)
    expected = reference_attention(qkv, lengths, slopes, scale)
    tol = 1e-5 if dtype == torch.float32 else 5e-3   # fp16: inputs and p rounded to fp16
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=tol)


def test_varlen_attention_bias_is_the_in_sequence_distance(device):
    """Two copies of one sequence in a pack give two equal outputs (positions restart per
    sequence), and with ALiBi the output differs from no bias (the term is applied)."""
    one = randn(24, 3, 2, 16, seed=3, device=device)
    qkv = torch.cat([one, one])
    cu = torch.tensor([0, 24, 48], dtype=torch.int32, device=device)
    slopes = torch.tensor([0.5, 0.25], device=device)
    out = kernels_attention.alibi_varlen_attention(qkv, cu, 24, slopes, 0.25, block_m=16, block_n=16)
    torch.testing.assert_close(out[:24], out[24:], rtol=0, atol=1e-6)
    plain = kernels_attention.alibi_varlen_attention(qkv, cu, 24, None, 0.25, block_m=16, block_n=16)
    assert (out - plain).abs().max() > 0.1


def test_varlen_attention_empty_pack(device):
    out = kernels_attention.alibi_varlen_attention(torch.zeros(0, 3, 2, 16, device=device),
                                                   torch.zeros(1, dtype=torch.int32, device=device), 0,
                                                   torch.ones(2, device=device), 0.25)
    assert out.shape == (0, 2, 16)


# --------------------------------------------------------------------------- rotary of q and k


def reference_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float64 on CPU: halves (x1, x2) of head_dim -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x, cos, sin = x.cpu().double(), cos.cpu().double(), sin.cpu().double()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def angles(lead: tuple, half: int, seed: int, device):
    """cos, sin [*lead, 1, half] float32 for random positions (frequencies 10000^(-i/half))."""
    positions = torch.randint(0, 200, lead, generator=torch.Generator().manual_seed(seed)).double()
    theta = positions[..., None, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    return theta.cos().float().to(device), theta.sin().float().to(device)


# (q/k shape [..., heads, head_dim], dtype). Token counts not a multiple of the kernel's 4-token
# block, head counts not a power of two (masked lanes), 4-D [B, L, heads, head_dim] input.
ROTARY_CASES = {
    "t11-h3-d16": ((11, 3, 16), torch.float32),
    "t5-h2-d64": ((5, 2, 64), torch.float32),
    "b2-l5-h3-d32": ((2, 5, 3, 32), torch.float32),
    "t7-h4-d16-fp16": ((7, 4, 16), torch.float16),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_rotary_qk_equals_reference(case, inplace, device):
    shape, dtype = ROTARY_CASES[case]
    q, k = (randn(*shape, seed=seed, dtype=dtype, device=device) for seed in (1, 2))
    cos, sin = angles(shape[:-2], shape[-1] // 2, seed=3, device=device)
    expected_q, expected_k = reference_rotary(q, cos, sin), reference_rotary(k, cos, sin)
    q_in, k_in = q.clone(), k.clone()
    out_q, out_k = kernels_rotary.rotary_qk(q_in, k_in, cos, sin, inplace=inplace)
    tol = 1e-6 if dtype == torch.float32 else 4e-3   # fp16: one rounding of values up to ~4
    for out, expected in ((out_q, expected_q), (out_k, expected_k)):
        assert out.shape == shape and out.dtype == dtype
        torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=tol)
    if inplace:
        assert out_q is q_in and out_k is k_in
    else:
        assert torch.equal(q_in, q) and torch.equal(k_in, k)


@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
def test_rotary_qk_on_views_of_a_fused_projection(inplace, device):
    """q and k as slices of one [T, 3, heads, head_dim] projection (token stride 3x a row): in
    place they are rotated where they lie and v is untouched; otherwise nothing is written."""
    qkv = randn(9, 3, 3, 32, seed=4, device=device)
    before = qkv.clone()
    q, k = qkv[:, 0], qkv[:, 1]
    cos, sin = angles((9,), 16, seed=5, device=device)
    expected_q, expected_k = reference_rotary(before[:, 0], cos, sin), reference_rotary(before[:, 1], cos, sin)
    out_q, out_k = kernels_rotary.rotary_qk(q, k, cos, sin, inplace=inplace)
    torch.testing.assert_close(out_q.cpu().double(), expected_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_k.cpu().double(), expected_k, rtol=0, atol=1e-6)
    assert torch.equal(qkv[:, 2], before[:, 2])
    if inplace:
        torch.testing.assert_close(qkv[:, 0].cpu().double(), expected_q, rtol=0, atol=1e-6)
        torch.testing.assert_close(qkv[:, 1].cpu().double(), expected_k, rtol=0, atol=1e-6)
    else:
        assert torch.equal(qkv, before)


# --------------------------------------------------------------------------- add + LayerNorm


def reference_layer_norm(s: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """float64 on CPU, over the last dim: (s - mean) / sqrt(biased var + eps) * w + b."""
    s, weight, bias = s.cpu().double(), weight.cpu().double(), bias.cpu().double()
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    return (s - mean) / torch.sqrt(var + eps) * weight + bias


# (shape, dtype, with the residual y, eps, block_rows or None for the default tiling, layout of x:
# "rows" = x a column slice of a wider buffer (row stride 2N, y's stays N), "cols" = every
# other column (not unit-stride: the kernel gets a copy)).
LAYER_NORM_CASES = {
    "r37-n48-add": ((37, 48), torch.float32, True, 1e-5, None, None),
    "r37-n48-add-4rows": ((37, 48), torch.float32, True, 1e-5, 4, None),
    "r3x7-n20-alone-eps": ((3, 7, 20), torch.float32, False, 0.25, None, None),
    "r9-n100-add-fp16": ((9, 100), torch.float16, True, 1e-5, 2, None),
    "r10-n24-add-rowstride": ((10, 24), torch.float32, True, 1e-3, 4, "rows"),
    "r6-n24-alone-colstride": ((6, 24), torch.float32, False, 1e-5, None, "cols"),
}


@pytest.mark.parametrize("case", LAYER_NORM_CASES)
def test_add_layer_norm_equals_reference(case, device):
    shape, dtype, add, eps, block_rows, layout = LAYER_NORM_CASES[case]
    n = shape[-1]
    if layout == "rows":
        x = (randn(*shape[:-1], 2 * n, seed=6) * 3 + 1).to(device, dtype)[..., :n]
    elif layout == "cols":
        x = (randn(*shape[:-1], 2 * n, seed=6) * 3 + 1).to(device, dtype)[..., ::2]
    else:
        x = (randn(*shape, seed=6) * 3 + 1).to(device, dtype)   # rows with a mean far from 0
    y = randn(*shape, seed=7, dtype=dtype, device=device) if add else None
    weight = (1 + 0.5 * randn(n, seed=8)).to(device, dtype)
    bias = (0.5 * randn(n, seed=9)).to(device, dtype)
    x_before = x.clone()
    total, normed = kernels_elementwise.add_layer_norm(x, y, weight, bias, eps, block_rows=block_rows)
    assert torch.equal(x, x_before)
    assert total.shape == normed.shape == shape and total.dtype == normed.dtype == dtype
    if add:   # the sum, rounded once to the stream's dtype
        expected_total = (x.double() + y.double()).to(dtype)
        assert torch.equal(total, expected_total)
    else:
        assert total is x
        expected_total = x
    expected = reference_layer_norm(expected_total, weight, bias, eps)
    tol = 1e-5 if dtype == torch.float32 else 1e-2   # fp16: one rounding of values up to ~4
    torch.testing.assert_close(normed.cpu().double(), expected, rtol=0, atol=tol)


def test_add_layer_norm_normalises_the_rounded_sum(device):
    """fp16 rows near 1000 (spacing 0.5) plus |y| < 0.25: the sum rounds back to x, so the
    norm must be LayerNorm(x) exactly as the two-pass form computes it, not of the exact x + y."""
    g = torch.Generator().manual_seed(10)
    x = (1000 + 0.5 * torch.randint(-8, 9, (8, 40), generator=g)).to(device, torch.float16)
    y = (0.4 * torch.rand(8, 40, generator=g) - 0.2).to(device, torch.float16)
    weight = torch.ones(40, device=device, dtype=torch.float16)
    bias = torch.zeros(40, device=device, dtype=torch.float16)
    total, normed = kernels_elementwise.add_layer_norm(x, y, weight, bias, 1e-5)
    assert torch.equal(total, x)
    expected = reference_layer_norm(x, weight, bias, 1e-5)
    torch.testing.assert_close(normed.cpu().double(), expected, rtol=0, atol=1e-2)
