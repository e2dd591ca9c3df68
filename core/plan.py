"""The execution plan: how one model instance runs, decided once at load from its settings and device.

`choose_plan(config, encoder)` is the one place that turns the `RuntimeConfig` (the model
config's parameters) and the device into concrete choices: device, dtype, attention backend,
whether our Triton kernels do the element-wise work, whether torch.compile runs. The encoder
then takes the plan (`encoder.prepare(plan)`) and follows it; nothing else switches its paths.
A new way of running (e.g. another dtype for the GEMMs) is one more field here, chosen in
`choose_plan`, and the op it selects in the encoder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import fp8, triton_support
from .attention import flash_varlen_available, flex_available

DEVICES_HELP = "auto | cpu | cuda | cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_CHOICES = ("auto", "padded", "flash", "flex", "triton")
KERNEL_CHOICES = ("auto", "triton", "torch")
# The linears' formats (ExecutionPlan.linears): "native" = the dtype's GEMMs; the fp8 plans
# (RuntimeConfig.dtype "fp8" | "fp8-ffn" | "fp8-smooth") run bf16 with e4m3 linears (fp8.py).
LINEARS = ("native",) + fp8.PLANS


@dataclass(frozen=True)
class ExecutionPlan:
    """What runs: every field concrete (no "auto"). The default is the portable eager path."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    attention: str = "padded"   # "padded" | "flash" | "flex" | "triton" (see attention.py)
    kernels: bool = False       # our Triton kernels for the element-wise work (ESM-2: rotary, add + LayerNorm)
    compiled: bool = False      # torch.compile of each layer's element-wise functions
    linears: str = "native"     # "native" | "fp8" (every linear in e4m3) | "fp8-ffn" (the feed-forward's)
                                # | "fp8-smooth" (every linear, LayerNorm outliers moved into the weights)

    def describe(self) -> str:
        """One line for the server log: what runs on this instance."""
        linears = {"fp8": ", linears fp8 e4m3 (all; per-channel weights, per-token activations)",
                   "fp8-ffn": ", linears fp8 e4m3 (feed-forward only; per-channel weights, per-token "
                              "activations)",
                   "fp8-smooth": ", linears fp8 e4m3 (all; LayerNorm outlier channels moved into the "
                                 "weights; per-channel weights, per-token activations)"}.get(self.linears, "")
        return (f"device {self.device}, dtype {str(self.dtype).replace('torch.', '')}{linears}, "
                f"attention {self.attention}, our kernels {'on' if self.kernels else 'off'}, "
                f"compiled {'on' if self.compiled else 'off'}")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda:0 when CUDA is available, else cpu; other names as torch reads them."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def choose_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA compute capability >= 8.0 (Ampere and later), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def choose_plan(config, encoder: torch.nn.Module) -> ExecutionPlan:
    """The plan for `encoder` under `config` (a RuntimeConfig); ValueError for a choice that cannot run.

    The encoder class declares what it can take: `ATTENTION_BACKENDS` (concrete names),
    `HAS_ALIBI` (a bias term: no flash), `kernels_fit()` (our kernels take its sizes) and
    `COMPILE_WITH_KERNELS` (False: with our kernels it runs eager, measured faster).
    """
    device = resolve_device(config.device)
    linears = linears_for(config.dtype, device, encoder)
    dtype = (choose_dtype(device) if config.dtype == "auto" else
             torch.bfloat16 if linears != "native" else DTYPES[config.dtype])
    name = type(encoder).__name__
    compile_requested = config.compile is True
    kernels = _use_kernels(config.kernels, device, encoder,
                           yield_to_compile=compile_requested and not encoder.COMPILE_WITH_KERNELS)
    if kernels and compile_requested and not encoder.COMPILE_WITH_KERNELS:
        raise ValueError(f"{name} runs our kernels eager: compile=True needs kernels='torch' (or 'auto')")
    compiled = device.type == "cuda" if config.compile is None else config.compile
    if config.compile is None and kernels and not encoder.COMPILE_WITH_KERNELS:
        compiled = False
    attention = _attention(config.attention, kernels, device, dtype, encoder)
    return ExecutionPlan(device=device, dtype=dtype, attention=attention, kernels=kernels, compiled=compiled,
                         linears=linears)


def linears_for(dtype: str, device: torch.device, encoder: torch.nn.Module) -> str:
    """ExecutionPlan.linears for RuntimeConfig.dtype; ValueError where fp8 cannot run."""
    if dtype not in fp8.PLANS and dtype != fp8.AUTO:
        return "native"
    problem = fp8.support_problem(device) or fp8.shape_problem(encoder)
    if not problem and dtype != fp8.AUTO and dtype not in fp8.runnable_plans(encoder):
        problem = (f"{type(encoder).__name__} puts its LayerNorms after the residual add (post-LN): their "
                   "output is the residual stream, so no linear could take the smoothing scales back; "
                   "fp8 or fp8-ffn run it")
    if problem:
        raise ValueError(f"dtype {dtype!r} refused: {problem}")
    return fp8.candidates(encoder)[0] if dtype == fp8.AUTO else dtype   # fp8-auto: warmup's gate may move on


def without_kernels(plan: ExecutionPlan, config, encoder: torch.nn.Module) -> ExecutionPlan:
    """The same plan on the PyTorch path (our kernels failed at warm-up under kernels="auto");
    compilation stays as it was."""
    attention = _attention(config.attention, False, plan.device, plan.dtype, encoder)
    return dataclasses.replace(plan, kernels=False, attention=attention)


def _use_kernels(policy: str, device: torch.device, encoder: torch.nn.Module, yield_to_compile: bool) -> bool:
    """Whether the encoder runs our Triton kernels (RuntimeConfig.kernels on this device)."""
    if policy == "torch" or (policy == "auto" and yield_to_compile):
        return False
    runnable = triton_support.can_run_on(device)
    fits = encoder.kernels_fit()
    if policy == "triton" and not (runnable and fits):
        why = ("the triton package is not installed" if triton_support.import_triton() is None
               else f"they need CUDA (device {device})" if not runnable
               else f"{type(encoder).__name__}'s sizes do not fit their tiles")
        raise ValueError(f"kernels='triton' requested but {why}")
    # "auto" uses them on CUDA only: on CPU they exist only under the interpreter (tests).
    return bool(runnable and fits and (policy == "triton" or device.type == "cuda"))


def _attention(choice: str, kernels: bool, device: torch.device, dtype: torch.dtype,
               encoder: torch.nn.Module) -> str:
    """The concrete attention backend: "auto" = ours with the kernels, else flash where the model has
    no bias and the device allows it, else padded; an explicit choice is checked here, at load."""
    name, allowed = type(encoder).__name__, encoder.ATTENTION_BACKENDS
    if choice == "auto":
        if kernels:
            choice = "triton"
        elif not encoder.HAS_ALIBI and flash_varlen_available(device, dtype):
            choice = "flash"
        else:
            choice = "padded"
    if choice not in allowed:
        raise ValueError(f"{name} does not take the {choice} attention backend ({', '.join(allowed)})")
    if choice == "flash" and not flash_varlen_available(device, dtype):
        raise ValueError("the flash varlen path needs CUDA, fp16/bf16 and no bias")
    if choice == "flex" and not flex_available():
        raise ValueError("the flex path needs torch.nn.attention.flex_attention (torch >= 2.5)")
    if choice == "triton":
        triton_support.require_runnable(device, "the triton attention path", ValueError)
        if not encoder.kernels_fit():
            raise ValueError(f"the triton attention path does not take {name}'s head size")
    return choice
