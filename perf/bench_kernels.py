"""Times our Triton kernels' tilings against the torch paths they replace, at the models' shapes.

    python3 perf/bench_kernels.py --out $OUT/bench_kernels.json      # one GPU, ~1 minute

On one packed stream of `--tokens` tokens (DNA chunks of 55-135 BPE tokens, as in bench_models):
  * attention (12 heads x 64, ALiBi): kernels_attention.alibi_varlen_attention per tiling, against
    the padded SDPA path (attention.PackedAttention "padded") on the same qkv;
  * attn_esm2 (40 heads x 64, no bias, protein frames of 40-170 residues): the same kernel without
    its bias term, against torch's flash varlen kernel (ESM-2's path without our kernels);
  * add + LayerNorm (bf16 rows of 2560, ESM-2 3B, and 768, DNABERT-S): kernels_elementwise per tiling
    (rows per program, warps), against ATen's `x + y` then `F.layer_norm` (ESM-2's eager path);
Each row: median microseconds (CUDA events, warm, 20 repeats), ns per token, the relative error
against the torch path. The fastest correct tiling is marked; core/kernels_attention.py's defaults
should be it (the constants there name what this script measured). Kernels timed here and
dropped because the torch path beat them: a fused GLU + GELU with pointer loads, an exact GELU, and
a persistent TMA GEMM with the GELU (or GELU x gate) in its epilogue (in git history as
core/kernels_gemm.py); perf/RESULTS.md has their figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

NORM_TILINGS = [(1, 4), (1, 8), (2, 8), (4, 8), (8, 8), (2, 4), (4, 4), (None, None)]  # None: the defaults
ATTENTION_TILINGS = [(64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 4), (128, 128, 8), (32, 32, 2),
                     (64, 128, 4), (32, 64, 2), (64, 64, 8)]


def import_core():
    """embed_core, installed or from this checkout (bench_models.import_core)."""
    spec = importlib.util.spec_from_file_location("bench_models", Path(__file__).resolve().parent / "bench_models.py")
    bench_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_models)
    return bench_models.import_core()


def time_us(fn, repeats: int = 20) -> float:
    """Median microseconds of fn() over `repeats` runs after 3 warm-ups (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return float(np.median(times))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_attention(tokens: int, device, rows: list, model: str = "dnabert_s") -> None:
    """Our varlen kernel per tiling against the torch path it replaces: DNABERT-S (12 x 64 heads,
    ALiBi, 55-135-token chunks) against padded SDPA with the bias; ESM-2 3B (40 x 64 heads, no bias,
    42-172-token frames) against torch's flash varlen kernel."""
    from embed_core import kernels_attention
    from embed_core.attention import PackedAttention
    from embed_core.dnabert_s import alibi_slopes
    heads, low, high = (12, 55, 136) if model == "dnabert_s" else (40, 42, 173)
    head_dim = 64
    rng = np.random.default_rng(0)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(rng.integers(low, high)))
    lengths = sorted(lengths)
    total, max_len = sum(lengths), max(lengths)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    if model == "dnabert_s":
        slopes = torch.tensor(alibi_slopes(heads), device=device)
        reference = PackedAttention(cu, max_len, total, torch.bfloat16, alibi_slopes=slopes, head_dim=head_dim,
                                    backend="padded")
        kernel, label = "attention", "torch: padded SDPA + ALiBi bias"
    else:
        slopes = None                                    # the kernel without its bias term
        reference = PackedAttention(cu, max_len, total, torch.bfloat16, scale=scale, head_dim=head_dim,
                                    backend="flash")
        kernel, label = "attn_esm2", "torch: flash varlen"
    ref = reference.attend_qkv(qkv)
    us = time_us(lambda: reference.attend_qkv(qkv))
    rows.append({"kernel": kernel, "variant": label, "us": us, "ns_per_token": us * 1e3 / total, "rel_error": 0.0})
    for block_m, block_n, warps in ATTENTION_TILINGS:
        run = lambda: kernels_attention.alibi_varlen_attention(qkv, cu, max_len, slopes, scale,  # noqa: E731
                                                               block_m=block_m, block_n=block_n, num_warps=warps)
        try:
            err = rel_error(run(), ref)
            us = time_us(run)
        except Exception as exc:  # noqa: BLE001 (a benchmark reports and goes on)
            rows.append({"kernel": kernel, "variant": f"triton {block_m}x{block_n} w{warps}",
                         "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        rows.append({"kernel": kernel, "variant": f"triton {block_m}x{block_n} w{warps}", "us": us,
                     "ns_per_token": us * 1e3 / total, "rel_error": err,
                     "tiling": {"block_m": block_m, "block_n": block_n, "num_warps": warps}})


def bench_add_layer_norm(tokens: int, width: int, device, rows: list, quant: bool = False) -> None:
    """quant: the fp8 plans' variant (the norm as e4m3 rows), against ATen's add + LayerNorm in bf16
    (the bf16 plan's step) and the PyTorch e4m3 steps (esm2_steps.add_norm_torch_fp8)."""
    from embed_core import kernels_elementwise
    from embed_core.esm2_steps import add_norm_torch_fp8
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, width, device=device, generator=g).to(torch.bfloat16)
    y = torch.randn(tokens, width, device=device, generator=g).to(torch.bfloat16)
    weight = torch.ones(width, device=device, dtype=torch.bfloat16)
    bias = torch.zeros(width, device=device, dtype=torch.bfloat16)

    def aten():
        total = x + y
        return total, torch.nn.functional.layer_norm(total, (width,), weight, bias, 1e-5)

    ref = aten()[1]
    kernel = f"addnorm{width}{'_e4m3' if quant else ''}"
    us = time_us(aten)
    rows.append({"kernel": kernel, "variant": "torch: x + y, F.layer_norm (2 passes)", "us": us,
                 "ns_per_token": us * 1e3 / tokens, "rel_error": 0.0})
    if quant:
        ref = add_norm_torch_fp8(x, y, weight, bias, 1e-5)[1]
    for block_rows, warps in NORM_TILINGS:
        name = f"triton {block_rows} rows w{warps}" if block_rows else "triton, kernels_elementwise's defaults"
        run = lambda: kernels_elementwise.add_layer_norm(x, y, weight, bias, 1e-5, block_rows=block_rows,  # noqa: E731
                                                       num_warps=warps, quant=quant)
        try:
            err = fp8_error(run()[1], ref) if quant else rel_error(run()[1], ref)
            us = time_us(run)
        except Exception as exc:  # noqa: BLE001 (a benchmark reports and goes on)
            rows.append({"kernel": kernel, "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        rows.append({"kernel": kernel, "variant": name, "us": us, "ns_per_token": us * 1e3 / tokens,
                     "rel_error": err, "tiling": {"block_rows": block_rows, "num_warps": warps}})


GELU_LAUNCHES = [(1, 1024, 4), (1, 2048, 4), (1, 2048, 8), (1, 4096, 8), (2, 1024, 4), (2, 2048, 8), (4, 1024, 8),
                 (1, 16384, 16), (1, 16384, 32), None]   # (rows, chunk, warps); 16384: whole rows; None: defaults
QUANT_LAUNCHES = [(1, 4096, 4), (1, 4096, 8), (2, 4096, 8), (4, 4096, 16), (1, 1024, 4), None]
ESM2_3B_LINEARS = {"qkv": (2560, 7680), "out": (2560, 2560), "fc1": (2560, 10240), "fc2": (10240, 2560)}


def fp8_error(rows, ref) -> float:
    """Relative error of Fp8Rows against the fp8.quantize_rows reference, both dequantized."""
    from embed_core import fp8
    return rel_error(fp8.dequantize(rows), fp8.dequantize(ref))


def bench_quantize(tokens: int, width: int, device, rows: list, gelu: bool) -> None:
    """kernels_quant per launch (rows per program, chunk, warps) against the PyTorch steps: ESM-2 3B's
    GELU + e4m3 of fc1's output (width 10240, against ATen's bf16 GELU, the bf16 plan's step) or the
    attention output's e4m3 pass (width 2560)."""
    from embed_core import fp8, kernels_quant
    x = torch.randn(tokens, width, device=device, generator=torch.Generator(device=device).manual_seed(0))
    x = x.to(torch.bfloat16)
    ref = fp8.quantize_rows(torch.nn.functional.gelu(x.float()) if gelu else x)
    kernel = f"{'gelu_q' if gelu else 'quant'}{width}"
    if gelu:
        us = time_us(lambda: torch.nn.functional.gelu(x))
        rows.append({"kernel": kernel, "variant": "torch: ATen GELU bf16 (no e4m3)", "us": us,
                     "ns_per_token": us * 1e3 / tokens, "rel_error": 0.0})
    us = time_us(lambda: x.clone())
    rows.append({"kernel": kernel, "variant": "torch: copy (memory bound, 2 B in + 2 B out)", "us": us,
                 "ns_per_token": us * 1e3 / tokens, "rel_error": 0.0})
    quantize = kernels_quant.gelu_quantize_rows if gelu else kernels_quant.quantize_rows
    for launch in GELU_LAUNCHES if gelu else QUANT_LAUNCHES:
        launch = kernels_quant.Launch(*launch) if launch else None
        if launch and launch.chunk < width < kernels_quant.CHUNKED_ABOVE:
            continue
        name = f"triton {launch.rows} rows x {launch.chunk} w{launch.warps}" if launch else "triton, defaults"
        run = lambda: quantize(x, launch)  # noqa: E731
        try:
            err = fp8_error(run(), ref)
            us = time_us(run)
        except Exception as exc:  # noqa: BLE001 (a benchmark reports and goes on)
            rows.append({"kernel": kernel, "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        rows.append({"kernel": kernel, "variant": name, "us": us, "ns_per_token": us * 1e3 / tokens, "rel_error": err,
                     "launch": launch._asdict() if launch else None})


def bench_scaled_mm(tokens: int, device, rows: list) -> None:
    """ESM-2 3B's four linears: bf16 F.linear against torch._scaled_mm with row-wise scales, with
    and without use_fast_accum (Hopper's fp8 accumulation without the periodic fp32 promotion);
    rel_error against the fp32 product of the same e4m3 operands."""
    from embed_core import fp8
    g = torch.Generator(device=device).manual_seed(0)
    for name, (k, n) in ESM2_3B_LINEARS.items():
        x = torch.randn(tokens, k, device=device, generator=g).to(torch.bfloat16)
        w = (0.02 * torch.randn(n, k, device=device, generator=g)).to(torch.bfloat16)
        xq, wq = fp8.quantize_rows(x), fp8.quantize_weight(w)
        ref = fp8.dequantize(xq) @ fp8.dequantize(wq).t()
        flops = 2.0 * tokens * k * n
        kernel = f"gemm_{name}"
        cases = [("bf16 F.linear", lambda: torch.nn.functional.linear(x, w), False)]
        for fast in (False, True):
            cases.append((f"e4m3 row-wise{', fast accum' if fast else ''}",
                          lambda fast=fast: torch._scaled_mm(xq.q, wq.q.t(), scale_a=xq.scale, scale_b=wq.scale,
                                                             out_dtype=torch.bfloat16, use_fast_accum=fast), True))
        for label, run, quantized in cases:
            us = time_us(run)
            rows.append({"kernel": kernel, "variant": f"{label} ({flops / us / 1e6:,.0f} TFLOP/s)", "us": us,
                         "ns_per_token": us * 1e3 / tokens,
                         "rel_error": rel_error(run(), ref) if quantized else 0.0})
        del x, w, xq, wq, ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131072, help="tokens in the packed stream (a full pack)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--only", default="all", choices=("all", "attention", "fp8"),
                   help="attention: the attention rows alone (a shorter run); fp8: the fp8 plans' kernels "
                   "(GELU + e4m3, e4m3 rows, add + LayerNorm + e4m3, the e4m3 GEMMs) alone")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (the kernels' speed is what it measures)")
        return 2
    import_core()   # embed_core, from this checkout where it is not installed
    device = torch.device("cuda")
    rows: list = []
    for tokens in sorted({args.tokens, 32768}):
        part: list = []
        if args.only != "fp8":
            bench_attention(tokens, device, part, "dnabert_s")
            bench_attention(tokens, device, part, "esm2")
        if args.only == "all":
            for width in (2560, 768):
                bench_add_layer_norm(tokens, width, device, part)
        if args.only in ("all", "fp8") and torch.cuda.get_device_capability(device) >= (8, 9):
            bench_quantize(tokens, 10240, device, part, gelu=True)
            bench_quantize(tokens, 2560, device, part, gelu=False)
            bench_add_layer_norm(tokens, 2560, device, part, quant=True)
            bench_scaled_mm(tokens, device, part)
        for row in part:
            row["tokens"] = tokens
        rows += part
    print(f"\nbench_kernels on {torch.cuda.get_device_name(device)}")
    print(f"{'tokens':>7} {'kernel':11} {'variant':48} {'us':>9} {'ns/token':>9} {'rel.err':>8}")
    for (tokens, kernel), group in _groups(rows):
        ok = [r for r in group if "us" in r and r["rel_error"] < 2e-2]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        for r in group:
            if "error" in r:
                print(f"{tokens:7d} {kernel:11} {r['variant'][:48]:48} FAILED {r['error'][:80]}")
                continue
            mark = " *" if r is best else ""
            print(f"{tokens:7d} {kernel:11} {r['variant'][:48]:48} {r['us']:9.1f} {r['ns_per_token']:9.2f} "
                  f"{r['rel_error']:8.1e}{mark}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


def _groups(rows):
    keys = []
    for r in rows:
        key = (r["tokens"], r["kernel"])
        if key not in keys:
            keys.append(key)
    return [(k, [r for r in rows if (r["tokens"], r["kernel"]) == k]) for k in keys]


if __name__ == "__main__":
    sys.exit(main())
