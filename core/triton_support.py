"""What our hand-written Triton kernels (kernels_*.py) share: the optional import and where they run.

`triton` is an optional package (CI has none; CUDA builds of torch bring it). Kernels run on CUDA,
or anywhere under Triton's interpreter (TRITON_INTERPRET=1, set before the kernel is first built):
that is how the tests check them on a CPU.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch


@functools.lru_cache(maxsize=None)
def import_triton() -> Optional[Tuple[ModuleType, ModuleType]]:
    """(triton, triton.language), or None where triton is not installed (imported on first use)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def can_run_on(device) -> bool:
    """Whether Triton kernels can run on `device`: triton importable and CUDA (or the interpreter)."""
    device = torch.device(device)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpret) and import_triton() is not None


def lazy_kernel(build: Callable) -> Callable:
    """`build(triton, tl)` -> a jitted kernel, turned into a cached `kernel()` that builds it on
    first use and returns None where triton is not installed."""
    @functools.lru_cache(maxsize=None)
    def kernel():
        modules = import_triton()
        return None if modules is None else build(*modules)
    return kernel
