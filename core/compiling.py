"""torch.compile for the hot per-layer functions, made safe inside Triton's Python stub.

Inductor fuses the element-wise work around the GEMMs (bias + residual + LayerNorm,
GELU x gate, rotary) that eager PyTorch runs as separate passes over memory. It is used
on CUDA only (the runtime decides); CPU stays eager, so tests and CI compile nothing.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch


def compile_function(fn: Callable) -> Callable:
    """`torch.compile(fn)` with a dynamic token dimension (packs differ in length).

    Weights are arguments, not closures, so one compiled graph serves every layer.
    Inside Triton's stub `sys.executable` is the stub binary, not Python, so Inductor's
    pool of compile worker processes cannot start there: compile in-process instead.
    """
    if not os.path.basename(sys.executable).startswith("python"):
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, dynamic=True)
