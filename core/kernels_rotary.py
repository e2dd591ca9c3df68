"""Hand-written Triton kernel for ESM-2's rotary embedding of q and k (where the plan runs our kernels).

An execution plan with our kernels (plan.py) binds `esm2.rotate_qkv_triton`, which calls this in
place on the fused q/k/v projection: one launch rotates q and k together, reading each token's
cos/sin row once (fp32), doing the math in fp32 and storing in the input dtype. It is exactly
`apply_rotary` / `rotate_fused`: out = (x1 cos - x2 sin, x2 cos + x1 sin), halves of head_dim.

Never imported by default: `triton` is an optional package (the test extra has it). `available(device)`
says whether the kernel can run there (CUDA, or any device with TRITON_INTERPRET=1: tests).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .triton_support import can_run_on, lazy_kernel


@lazy_kernel("rotary_qk")
def _kernel(triton, tl):
    """The jitted kernel (`_kernel()` builds it on first use)."""

    # T (tokens in the pack) changes with every pack: not specialised on (Triton would compile a
    # second variant the first time a pack's T is a multiple of 16, mid-serving).
    @triton.jit(do_not_specialize=["T"])
    def rotary_qk_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, H,
                         q_st, q_sh, k_st, k_sh, qo_st, qo_sh, ko_st, ko_sh, c_st, s_st,
                         HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        # One program: BLOCK_T tokens x all heads (BLOCK_H >= H, masked) x head_dim/2 pairs.
        pid = tl.program_id(0)
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]            # [BT, 1, 1]
        h = tl.arange(0, BLOCK_H)[None, :, None]                             # [1, BH, 1]
        d = tl.arange(0, HALF)[None, None, :]                                # [1, 1, HALF]
        t_ok = t < T
        m = t_ok & (h < H)
        c = tl.load(cos_ptr + t * c_st + d, mask=t_ok, other=0.0).to(tl.float32)   # [BT, 1, HALF]
        s = tl.load(sin_ptr + t * s_st + d, mask=t_ok, other=0.0).to(tl.float32)

        # q and k written out twice on purpose: a shared @triton.jit helper fails under the
        # interpreter the CPU tests use (closure NameError).
        q_off = t * q_st + h * q_sh + d
        q1 = tl.load(q_ptr + q_off, mask=m, other=0.0).to(tl.float32)
        q2 = tl.load(q_ptr + q_off + HALF, mask=m, other=0.0).to(tl.float32)
        qo_off = t * qo_st + h * qo_sh + d
        tl.store(qo_ptr + qo_off, (q1 * c - q2 * s).to(qo_ptr.dtype.element_ty), mask=m)
        tl.store(qo_ptr + qo_off + HALF, (q2 * c + q1 * s).to(qo_ptr.dtype.element_ty), mask=m)

        k_off = t * k_st + h * k_sh + d
        k1 = tl.load(k_ptr + k_off, mask=m, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + k_off + HALF, mask=m, other=0.0).to(tl.float32)
        ko_off = t * ko_st + h * ko_sh + d
        tl.store(ko_ptr + ko_off, (k1 * c - k2 * s).to(ko_ptr.dtype.element_ty), mask=m)
        tl.store(ko_ptr + ko_off + HALF, (k2 * c + k1 * s).to(ko_ptr.dtype.element_ty), mask=m)

    return rotary_qk_kernel


# Where the kernel can run (CUDA, or Triton's interpreter): triton_support's answer for all kernels.
available = can_run_on


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head_dim: even, with a power-of-2 half (ESM-2 8M..3B: 16..64;
    not the 35M model's 24)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half > 0 and half & (half - 1) == 0


def _rows(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """x [..., heads, head_dim] as a [N, heads, head_dim] view with a unit last stride (copy if needed)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, heads, head_dim)
    except RuntimeError:
        return x.reshape(-1, heads, head_dim)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              inplace: bool = False, block_t: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary of q and k [..., heads, head_dim] by cos, sin [..., 1, head_dim/2] (float32) in one launch.

    Returns (q', k') in q's and k's dtype. `inplace`: write into q and k themselves (they must
    be views the kernel can address: [N, heads, head_dim] with a unit last stride; else this
    falls back to writing new tensors and copying back).
    """
    kernel = _kernel()
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    heads, head_dim = q.shape[-2], q.shape[-1]
    half = head_dim // 2
    if not supports(head_dim):
        raise ValueError(f"head_dim {head_dim}: the kernel needs an even head_dim with a power-of-2 half")
    q3, k3 = _rows(q, heads, head_dim), _rows(k, heads, head_dim)
    n = q3.shape[0]
    c2 = cos.reshape(-1, cos.shape[-1])
    s2 = sin.reshape(-1, sin.shape[-1])
    if c2.shape != (n, half) or s2.shape != (n, half):
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not match {n} rows of head_dim/2 = {half}")
    c2 = c2 if c2.stride(-1) == 1 else c2.contiguous()
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    # In place only where q3/k3 are views of q/k (no copy was needed to address them).
    direct = inplace and q3.data_ptr() == q.data_ptr() and k3.data_ptr() == k.data_ptr()
    if direct:
        qo, ko = q3, k3
    else:
        qo, ko = torch.empty_like(q3), torch.empty_like(k3)
    if n:
        block_h = 1 << max(0, (heads - 1).bit_length())
        grid = (-(-n // block_t),)
        kernel[grid](q3, k3, qo, ko, c2, s2, n, heads,
                     q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
                     qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), c2.stride(0), s2.stride(0),
                     HALF=half, BLOCK_T=block_t, BLOCK_H=block_h)
    if inplace:
        if not direct:
            q.copy_(qo.view(q.shape))
            k.copy_(ko.view(k.shape))
        return q, k
    return qo.view(q.shape), ko.view(k.shape)
