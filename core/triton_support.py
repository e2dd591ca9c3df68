"""What our hand-written Triton kernels (kernels_*.py) share: the optional import and where they run.

`triton` is an optional package (CUDA builds of torch bring it; the test extra pins it). Kernels run
on CUDA, or anywhere under Triton's interpreter: TRITON_INTERPRET=1, set before triton is first
imported (triton.language's own functions, tl.zeros and the like, are built for the interpreter or
not at that import). That is how the tests check them on a CPU (tests/conftest.py sets it there).
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


def require_runnable(device, what: str, error: type = RuntimeError) -> None:
    """Raises `error` naming `what` where our kernels cannot run on `device` (see can_run_on)."""
    if not can_run_on(device):
        raise error(f"{what} needs the triton package and a CUDA device (or TRITON_INTERPRET=1), "
                    f"not {torch.device(device).type}")


def lazy_kernel(what: str) -> Callable:
    """Decorator: `build(triton, tl)` -> a jitted kernel becomes a cached `kernel()` that builds it
    on first use; where triton is not installed it raises RuntimeError naming `what` (the
    function that launches it)."""
    def wrap(build: Callable) -> Callable:
        @functools.lru_cache(maxsize=None)
        def built():
            modules = import_triton()
            return None if modules is None else build(*modules)

        def kernel():
            jitted = built()
            if jitted is None:
                raise RuntimeError(f"{what} needs the triton package")
            return jitted
        return kernel
    return wrap
