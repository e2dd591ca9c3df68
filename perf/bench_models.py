"""Tokens/s of ESM-2 3B and DNABERT-S (real sizes, random weights) on one GPU, three ways, one run.

    python perf/bench_models.py --out perf/results/bench_models.json        # one GPU
    python perf/bench_models.py --small                                     # CPU smoke check: seconds
    python perf/bench_models.py --attention padded,flex,triton,auto --esm-rotary torch,auto \
        --skip-vanilla --profile                # each kernel's share, top kernels, GPU idle time

For each model, on the same synthetic workload (ESM-2: protein frames of 40-170 residues, mean
~100; DNABERT-S: 300-bp chunks = 55-135 BPE tokens, random token ids):
  (a) vanilla:   ESM-2: transformers EsmModel fp32 eager, padded, unsorted fixed-size batches;
                 DNABERT-S (transformers has no DNABERT-2 code): our forward_padded, fp32, unsorted;
  (b) plain fast path: ESM-2: transformers EsmModel bf16 SDPA, length-sorted batches;
                 DNABERT-S: our forward_padded bf16 (SDPA with the ALiBi bias), length-sorted;
  (c) ours:      embed_core Embedder bf16: packed, no padding, token budget from free memory;
                 on CUDA first eager (c_eager), then compiled: one run per `--attention` entry for
                 DNABERT-S (c = defaults, c_padded, c_flex, c_triton ...) and per `--esm-rotary`
                 entry for ESM-2 (c, c_torch, c_triton); the best compiled run is "(c)" in the
                 ratios and targets. `--profile` prints each (c) run's top CUDA kernels.
Paths (b) and (c) run the whole workload once untimed (compilation, kernel selection, the
allocator's growth: what a server does once), then timed. Every path mean-pools (ESM-2 without
BOS/EOS, DNABERT-S over all tokens) and copies the embeddings to the host, as a server would.
tokens/s counts real tokens (specials included, padding not). ESM-2's transformers model gets
our weights, so the run also reports the cosine between (c) and (a)/(b): the fast path computes
the same thing. Targets (issue #2): ESM-2 3B (c)/(b) >= 1.5; DNABERT-S (c) >= 2M tokens/s.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ESM2_3B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=40, intermediate_size=10240)
ESM2_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
DNABERT_S_FULL = dict(vocab_size=4096, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)
DNABERT_S_SMALL = dict(vocab_size=512, hidden_size=192, num_hidden_layers=2, num_attention_heads=12,
                       intermediate_size=384)   # head_dim 16: the smallest the Triton attention kernel takes
TARGETS = {"esm2_c_over_b": 1.5, "dnabert_s_c_tokens_per_s": 2.0e6,
           # issue 17: fp8 on every linear against our bf16 (c) in the same run; DNABERT-S fp8 tokens/s
           "esm2_fp8_over_c": 1.5, "dnabert_s_fp8_tokens_per_s": 2.2e6}
FP8_PLANS = ("fp8", "fp8-smooth", "fp8-ffn")   # variant entries that run RuntimeConfig(dtype=...): the fp8 plans


def import_core():
    """embed_core, installed or straight from this checkout's core/ (so the command needs no install)."""
    try:
        import embed_core
        return embed_core
    except ImportError:
        core = Path(__file__).resolve().parents[1] / "core"
        spec = importlib.util.spec_from_file_location("embed_core", core / "__init__.py",
                                                      submodule_search_locations=[str(core)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["embed_core"] = module
        spec.loader.exec_module(module)
        return module


# ---------------------------------------------------------------------------------- workloads


def protein_workload(n: int, seed: int) -> list:
    """Token ids of n protein frames: <cls> + 40-170 residues (normal around 100) + <eos>."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.normal(100, 30, n)), 40, 170).astype(int)
    return [np.concatenate(([0], rng.integers(4, 24, size=L), [2])).astype(np.int64) for L in lengths]


def dna_workload(n: int, seed: int, vocab: int) -> list:
    """Token ids of n 300-bp chunks: [CLS] + BPE ids + [SEP], 55-135 tokens in all."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(55, 136, size=n)
    return [np.concatenate(([1], rng.integers(5, vocab, size=L - 2), [2])).astype(np.int64) for L in lengths]


def unsorted_batches(n: int, batch_size: int) -> list:
    """Index batches in input order, a fixed number of sequences each."""
    return [np.arange(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


def sorted_batches(lengths: np.ndarray, padded_tokens: int) -> list:
    """Length-sorted index batches of at most `padded_tokens` = batch x longest."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or (i - start + 1) * lengths[order[i]] > padded_tokens:
            batches.append(order[start:i])
            start = i
    return batches


def pad(token_arrays: list, pad_id: int) -> tuple:
    lengths = np.array([len(t) for t in token_arrays])
    ids = np.full((len(token_arrays), lengths.max()), pad_id, dtype=np.int64)
    for i, t in enumerate(token_arrays):
        ids[i, :len(t)] = t
    return torch.from_numpy(ids), torch.from_numpy(np.arange(lengths.max())[None] < lengths[:, None])


# ---------------------------------------------------------------------------------- running


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_graphs() -> int:
    """Graphs torch.compile has produced so far in this process (0 when Dynamo was never loaded)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def measure(name: str, fn, work: list, warm: list, device: torch.device) -> tuple:
    """(figures, output): runs fn(warm), then times fn(work); fn returns [N, H] float32 on the host.

    Also reports the warm-up's seconds (compilation happens there) and the torch.compile graphs
    compiled during the timed run ("recompiles": should be 0; more means the timing includes
    compilation, e.g. a shape that specialised)."""
    graphs_before = compiled_graphs()
    t0 = time.perf_counter()
    fn(warm)
    sync(device)
    warm_s = time.perf_counter() - t0
    graphs_warm = compiled_graphs()
    if device.type == "cuda":
        # No empty_cache() here: a server keeps the allocator's blocks between requests, and
        # returning them first would time cudaMalloc calls no server makes.
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    out = fn(work)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = int(sum(len(t) for t in work))
    result = {"path": name, "sequences": len(work), "tokens": tokens, "seconds": round(seconds, 4),
              "tokens_per_s": tokens / seconds, "finite": bool(np.isfinite(out).all()),
              "warm_s": round(warm_s, 1), "graphs_compiled_warm": graphs_warm - graphs_before,
              "recompiles": compiled_graphs() - graphs_warm}
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_above_weights_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 2)
    return result, out


def padded_runner(forward, pad_id: int, skip: tuple, batches_of, device: torch.device):
    """fn(token_arrays) -> pooled [N, H]: padded batches (index lists from batches_of), input order."""
    from embed_core.packing import mean_pool_padded   # import_core() has run

    def run(token_arrays):
        out = None
        with torch.inference_mode():
            for idx in batches_of(token_arrays):
                ids, mask = pad([token_arrays[i] for i in idx], pad_id)
                ids, mask = ids.to(device), mask.to(device)
                pooled = mean_pool_padded(forward(ids, mask), mask, *skip).cpu().numpy()
                if out is None:
                    out = np.empty((len(token_arrays), pooled.shape[1]), np.float32)
                out[idx] = pooled
        return out
    return run


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of a and b (float64): the fp8 gate's."""
    from embed_core.fp8_gate import cosines   # import_core() has run
    return cosines(a, b)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-row cosine similarity of a and b."""
    return float(row_cosines(a, b).min())


def fp32_reference(core, model, tokenizer, args, device, work: list):
    """fp32 embeddings (PyTorch eager, padded attention) of work[:--fp32-ref-seqs], or None (0)."""
    part = work[:args.fp32_ref_seqs]
    if not part:
        return None
    embedder = core.Embedder(model, tokenizer, core.RuntimeConfig(
        device=str(device), dtype="float32", kernels="torch", attention="padded", compile=False,
        token_budget=args.token_budget))
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = embedder.embed_tokens(part)
    print(f"bench_models: fp32 reference of {len(part)} sequences in {time.perf_counter() - t0:.1f} s", flush=True)
    embedder.close()
    free_memory(device)
    return out


def random_init_(model: torch.nn.Module, seed: int, std) -> None:
    """Random weights in place, on the model's device (fast at 3B); LayerNorms near identity."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
            if "layernorm" in name.lower() or "layer_norm" in name.lower():
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(std(name, p) * noise)


def dnabert_std(name: str, p: torch.Tensor) -> float:
    """random_init_'s std for DNABERT-S, as random_dnabert_s: N(0, 1/fan_in) weights, unit embeddings,
    small biases."""
    if "embeddings" in name:
        return 1.0
    return 0.1 if p.dim() == 1 else p.shape[1] ** -0.5


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- models


def bench_esm2(core, args, device: torch.device, dtype: torch.dtype) -> dict:
    from embed_core.esm2 import ESM2, Esm2Config
    from embed_core.esm2_tokenizer import Esm2Tokenizer
    from transformers import EsmModel

    dims = ESM2_SMALL if args.small else ESM2_3B
    config = Esm2Config(**dims)
    t0 = time.perf_counter()
    with torch.device(device):
        ours = ESM2(config)
    random_init_(ours, seed=0, std=lambda name, p: 0.02)
    ours.eval()

    hf_config = hf_esm_config(config, dims)
    set_attention(None, hf_config, "eager")
    with torch.device(device):
        hf = EsmModel(hf_config, add_pooling_layer=False)
    copy_weights(ours, hf)
    hf.eval()
    ours.to(dtype)
    free_memory(device)
    build_s = time.perf_counter() - t0

    work = protein_workload(args.esm_seqs, seed=1)
    vanilla_work = work[:args.esm_vanilla_seqs]
    warm = work   # one full untimed pass first: the steady state a long-running server is in
    hf_forward = lambda ids, mask: hf(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    runs = {}

    out_a = None
    if vanilla_work:
        a = padded_runner(hf_forward, 1, (1, 1), lambda w: unsorted_batches(len(w), args.esm_vanilla_batch), device)
        runs["a"], out_a = measure("transformers EsmModel fp32 eager, padded, unsorted", a, vanilla_work,
                                   vanilla_work[:args.esm_vanilla_batch], device)
        del a
    hf.to(dtype)
    attn = set_attention(hf, hf_config, "sdpa")
    b = padded_runner(hf_forward, 1, (1, 1),
                      lambda w: sorted_batches(np.array([len(t) for t in w]), args.esm_sorted_tokens), device)
    runs["b"], out_b = measure(f"transformers EsmModel {name_of(dtype)} {attn}, length-sorted", b, work, warm,
                               device)
    del hf, b, hf_forward
    free_memory(device)

    variants = []
    for name in [r.strip() for r in args.esm_rotary.split(",") if r.strip()]:
        variant = rotary_variant(name, device)
        if isinstance(variant, str):
            print(f"bench_models: ESM-2 (c) with --esm-rotary {name} skipped: {variant[6:]}", flush=True)
        else:
            variants.append(variant)
    if not variants:
        raise SystemExit("bench_models: no --esm-rotary variant can run here")
    ref = fp32_reference(core, ours, Esm2Tokenizer(), args, device, work)
    embedder, out_c, c_key = run_ours(core, ours, Esm2Tokenizer(), args, device, dtype, work, warm, runs, out_b,
                                      variants, ref)
    result = summarize("esm2", dims, build_s, work, vanilla_work, runs, out_a, out_b, out_c, embedder, c_key)
    del embedder, ours
    free_memory(device)
    return result


def with_budget(variant_of):
    """Lets a variant entry carry a token budget, "NAME@TOKENS" (e.g. auto@32768): the same variant
    with RuntimeConfig.token_budget set and "_bTOKENS" added to its key."""
    def variant(entry: str, *rest):
        name, _, budget = entry.partition("@")
        out = variant_of(name, *rest)
        if not budget or isinstance(out, str):
            return out
        key, overrides, label = out
        return f"{key}_b{int(budget)}", {**overrides, "token_budget": int(budget)}, f"{label}, {int(budget)} tok"
    return variant


def variant_name(entry: str) -> str:
    """The variant without its @BUDGET (for validating the command line)."""
    name, _, budget = entry.strip().partition("@")
    if budget and not budget.isdigit():
        raise SystemExit(f"bench_models: {entry!r}: the budget after @ must be a number of tokens")
    return name


@with_budget
def attention_variant(name: str) -> tuple:
    """--attention entry -> ((c) key, RuntimeConfig overrides, label).

    "auto": the runtime's defaults (on CUDA with triton: our attention kernel), key "c". Any other
    entry pins the attention with kernels="torch", so each backend's share shows."""
    if name == "auto":
        return "c", {}, ", defaults"
    if name in FP8_PLANS:
        return fp8_variant(name)
    return f"c_{name}", {"attention": name, "kernels": "torch"}, f", attention {name}"


ESM_VARIANTS = ("auto", "torch", "triton", "eager", "flash") + FP8_PLANS   # rotary_variant's names


@with_budget
def rotary_variant(name: str, device: torch.device) -> tuple:
    """--esm-rotary entry -> ((c) key, RuntimeConfig overrides, label), or a reason it cannot run
    here. "auto": the runtime's defaults (key c); "triton" = RuntimeConfig(kernels="triton"),
    "torch" = kernels="torch"; "eager" = compile=False; "flash": the defaults (our rotary and
    add + LayerNorm kernels) with flash attention instead of kernels_attention's."""
    if name == "triton":
        from embed_core import kernels_rotary, triton_support
        if not kernels_rotary.available(device):
            why = ("the triton package is not installed" if triton_support.import_triton() is None
                   else f"needs CUDA (or TRITON_INTERPRET=1), device is {device.type}")
            return f"skip: {why}"
        return "c_triton", {"kernels": "triton"}, ", rotary triton kernel"
    if name == "torch":
        return "c_torch", {"kernels": "torch"}, ", rotary torch (Inductor)"
    if name == "eager":
        return "c_uncomp", {"compile": False}, ", defaults, not compiled"
    if name == "flash":
        return "c_flash", {"attention": "flash"}, ", defaults but flash attention"
    if name in FP8_PLANS:
        return fp8_variant(name)
    return "c", {}, ", defaults"


def fp8_variant(name: str) -> tuple:
    """An fp8 plan (RuntimeConfig dtype fp8 | fp8-smooth | fp8-ffn) with the runtime's other defaults."""
    return f"c_{name}", {"dtype": name}, f", {name} linears (e4m3)"


def run_ours(core, model, tokenizer, args, device, dtype, work, warm, runs, out_b=None, variants=(None,),
             ref=None):
    """(c): the Embedder under the runtime's policy; on CUDA with a compilable encoder also eager, first.

    `variants`: the (c) runs, each (key, RuntimeConfig overrides, label suffix) (see
    attention_variant / rotary_variant); None = the runtime's defaults, key "c".
    Returns (the last embedder, the output of the fastest (c) run, its key). A run that fails is
    reported and skipped, so one broken variant does not cost the others. The fp8 plans' runs are
    never "the fastest (c)" (they are measured against it); `ref`: fp32 embeddings of work[:len(ref)],
    each run's min/mean cosine against them in its figures.
    """
    def embedder_for(compile_, overrides=None):
        options = {"device": str(device), "dtype": name_of(dtype), "token_budget": args.token_budget,
                   "compile": compile_, **(overrides or {})}
        return core.Embedder(model, tokenizer, core.RuntimeConfig(**options))

    def run_one(key, label, embedder):
        try:
            runs[key], out = measure(label, embedder.embed_tokens, work, warm, device)
        except Exception as exc:  # noqa: BLE001 (a benchmark reports and goes on)
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            print(f"bench_models: ({key}) FAILED: {message}", flush=True)
            runs[key] = {"path": label, "error": message}
            return None
        if out_b is not None:
            runs[key]["min_cos_b"] = cosine_rows(out, out_b)
        if ref is not None:
            cos = row_cosines(out[:len(ref)], ref)
            runs[key]["cos_fp32"] = {"min": float(cos.min()), "mean": float(cos.mean()), "sequences": len(ref)}
        if args.profile and device.type == "cuda":
            profile(f"({key}) {label}", embedder, work, device, trace_dir=args.trace_dir)
        return out

    policy = {"auto": None, "on": True, "off": False}[args.compile]
    if device.type == "cuda" and policy is not False and not args.skip_eager:
        eager = embedder_for(False)
        run_one("c_eager", f"ours: Embedder {name_of(dtype)} packed, eager (budget {eager.token_budget})", eager)
        eager.close()
    best, out_best, embedder = None, None, None
    for variant in variants:
        key, overrides, label = variant or ("c", {}, "")
        embedder = embedder_for(policy, overrides)   # its execution plan: the model follows it from here
        how = "compiled" if embedder.plan.compiled else "eager"
        out = run_one(key, f"ours: Embedder {name_of(dtype)} packed, {how}{label} (budget {embedder.token_budget})",
                      embedder)
        embedder.close()
        native = not key.startswith(tuple(f"c_{p}" for p in FP8_PLANS))
        if out is not None and native and (best is None or runs[key]["tokens_per_s"] > runs[best]["tokens_per_s"]):
            best, out_best = key, out
    if best is None:
        raise RuntimeError("every (c) run failed")
    return embedder, out_best, best


KERNEL_CLASSES = (  # (label, substrings of CUDA kernel names), first match wins
    # triton_tem_*: Inductor template kernels; without max-autotune only flex_attention makes them.
    ("attention", ("flash", "fmha", "attention", "attn", "flex", "cudnn", "triton_tem")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "wgmma")),
    ("inductor fused", ("triton_",)),
    ("copy/index", ("copy", "index", "gather", "scatter", "cat", "memcpy", "memset", "fill")),
)


def profile(title: str, embedder, work: list, device: torch.device, rows: int = 9,
            trace_dir: Path = None) -> None:
    """The top CUDA kernels of one (c) run over a slice of the workload (torch.profiler), as a short
    table: share of kernel time, total ms, calls, name; a one-line split by kernel class; the GPU's
    idle time and longest gaps; with `trace_dir`, the Chrome trace as <key>.json.gz there."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    part = work[:max(1, len(work) // 4)]
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        embedder.embed_tokens(part)
        sync(device)
    kernels: dict = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us, calls = kernels.get(e.name, (0.0, 0))
            kernels[e.name] = (us + e.device_time_total, calls + 1)
    total = sum(us for us, _ in kernels.values())
    tokens = sum(len(t) for t in part)
    print(f"\n{title}: top CUDA kernels, {total / 1e3:.1f} ms kernel time for {tokens} tokens "
          f"({tokens / max(total, 1e-9) * 1e6:,.0f} tokens/s of kernel time)")
    if not total:
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=12, max_name_column_width=60))
        return
    classes: dict = {}
    for name, (us, _) in kernels.items():
        low = name.lower()
        label = next((lbl for lbl, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")
        classes[label] = classes.get(label, 0.0) + us
    print("  " + " | ".join(f"{lbl} {us / total:.0%}" for lbl, us in sorted(classes.items(), key=lambda kv: -kv[1])))
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {us / total:5.1%} {us / 1e3:8.1f} ms {calls:6d}x  {name[:88]}")
    print_gpu_idle(prof.events())
    if trace_dir is not None:
        import gzip
        import shutil
        import tempfile
        trace_dir.mkdir(parents=True, exist_ok=True)
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", title.split(")")[0].strip("( "))
        target = trace_dir / f"trace_{type(embedder.encoder).__name__}_{key}.json.gz"
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            prof.export_chrome_trace(tmp.name)
            with open(tmp.name, "rb") as src, gzip.open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        print(f"  trace: {target}")


def print_gpu_idle(events, rows: int = 5) -> None:
    """How long the GPU had no kernel running inside the profiled span, and the longest such gaps
    with the kernel that ended each (where the host made the device wait)."""
    from torch.autograd import DeviceType
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == DeviceType.CUDA)
    if not spans:
        return
    gaps, busy_end, last_name = [], spans[0][0], spans[0][2]
    for start, end, name in spans:
        if start > busy_end:
            gaps.append((start - busy_end, last_name, name))
        if end > busy_end:
            busy_end, last_name = end, name
    span = busy_end - spans[0][0]
    idle = sum(g for g, _, _ in gaps)
    print(f"  GPU idle {idle / 1e3:.1f} ms of {span / 1e3:.1f} ms ({idle / max(span, 1e-9):.1%}) in {len(gaps)} gaps; "
          f"longest:")
    for gap, before, after in sorted(gaps, reverse=True)[:rows]:
        print(f"    {gap / 1e3:7.2f} ms after {before[:50]} -> {after[:50]}")


def summarize(model, dims, build_s, work, vanilla_work, runs, out_a, out_b, out_c, embedder, c_key="c") -> dict:
    lengths = np.array([len(t) for t in work])
    c = runs[c_key]
    return {
        "model": model, "config": dims, "build_seconds": round(build_s, 1),
        "workload": {"sequences": len(work), "vanilla_sequences": len(vanilla_work),
                     "mean_tokens": float(lengths.mean()), "min_tokens": int(lengths.min()),
                     "max_tokens": int(lengths.max())},
        "runs": runs, "best_c": c_key, "token_budget": embedder.token_budget, "compiled": embedder.plan.compiled, "plan": embedder.plan.describe(),
        "forward_passes": embedder.stats.forward_passes,
        "ratios": {"c_over_b": c["tokens_per_s"] / runs["b"]["tokens_per_s"],
                   "c_over_a": c["tokens_per_s"] / runs["a"]["tokens_per_s"] if "a" in runs else None},
        "min_cosine": {"c_vs_a": cosine_rows(out_c[:len(vanilla_work)], out_a) if out_a is not None else None,
                       "c_vs_b": cosine_rows(out_c, out_b)},
    }


def hf_esm_config(config, dims: dict):
    """transformers' EsmConfig for our ESM2 `config` at `dims` (so copy_weights maps onto EsmModel)."""
    from transformers import EsmConfig
    return EsmConfig(vocab_size=33, mask_token_id=32, pad_token_id=1, position_embedding_type="rotary",
                     token_dropout=True, emb_layer_norm_before=False, layer_norm_eps=config.layer_norm_eps,
                     max_position_embeddings=1026, hidden_act="gelu", hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **dims)


def set_attention(model, config, implementation: str) -> str:
    """Selects transformers' attention implementation; returns the one in effect."""
    if model is not None and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        config._attn_implementation = implementation
    return (model.config if model is not None else config)._attn_implementation


def copy_weights(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Our ESM2 weights into transformers' EsmModel (same names; fails on anything that does not map)."""
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("inv_freq")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("inv_freq") or k.startswith("contact_head.")
                                          or "position" in k)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers' EsmModel: missing {missing}, "
                           f"unexpected {unexpected}")


def bench_dnabert_s(core, args, device: torch.device, dtype: torch.dtype) -> dict:
    from embed_core.dnabert_s import DnabertS, DnabertSConfig

    dims = DNABERT_S_SMALL if args.small else DNABERT_S_FULL
    t0 = time.perf_counter()
    with torch.device(device):
        model = DnabertS(DnabertSConfig(**dims))

    random_init_(model, seed=0, std=dnabert_std)
    model.eval()
    build_s = time.perf_counter() - t0

    work = dna_workload(args.dna_seqs, seed=2, vocab=dims["vocab_size"])
    vanilla_work = work[:args.dna_vanilla_seqs]
    warm = work   # one full untimed pass first: the steady state a long-running server is in
    runs = {}
    out_a = None
    if vanilla_work:
        a = padded_runner(model.forward_padded, 3, (0, 0),
                          lambda w: unsorted_batches(len(w), args.dna_vanilla_batch), device)
        runs["a"], out_a = measure("ours forward_padded fp32, padded, unsorted", a, vanilla_work,
                                   vanilla_work[:args.dna_vanilla_batch], device)
    model.to(dtype)
    b = padded_runner(model.forward_padded, 3, (0, 0),
                      lambda w: sorted_batches(np.array([len(t) for t in w]), args.dna_sorted_tokens), device)
    runs["b"], out_b = measure(f"ours forward_padded {name_of(dtype)} SDPA+ALiBi bias, length-sorted", b, work,
                               warm, device)
    variants = [attention_variant(b.strip()) for b in args.attention.split(",") if b.strip()]
    ref = fp32_reference(core, model, None, args, device, work)
    embedder, out_c, c_key = run_ours(core, model, None, args, device, dtype, work, warm, runs, out_b, variants, ref)
    result = summarize("dnabert_s", dims, build_s, work, vanilla_work, runs, out_a, out_b, out_c, embedder, c_key)
    del embedder, model
    free_memory(device)
    return result


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--small", action="store_true",
                   help="tiny models and workloads: a smoke check of every path in seconds (CPU is fine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of paths (b) and (c)")
    p.add_argument("--models", default="esm2,dnabert_s", help="comma-separated subset of esm2,dnabert_s")
    p.add_argument("--token-budget", type=int, default=None, help="(c) tokens per forward (default: auto)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="(c) torch.compile of the encoder's hot functions (auto: the runtime's policy, CUDA only)")
    p.add_argument("--esm-seqs", type=int, default=None, help="ESM-2 sequences for (b), (c) [6000; small 48]")
    p.add_argument("--esm-vanilla-seqs", type=int, default=None, help="ESM-2 sequences for (a) [640; small 16]")
    p.add_argument("--esm-vanilla-batch", type=int, default=32, help="(a) sequences per padded batch")
    p.add_argument("--esm-sorted-tokens", type=int, default=16384, help="(b) padded tokens per batch")
    p.add_argument("--dna-seqs", type=int, default=None, help="DNABERT-S sequences for (b), (c) [40000; small 96]")
    p.add_argument("--dna-vanilla-seqs", type=int, default=None, help="DNABERT-S sequences for (a) [4096; small 32]")
    p.add_argument("--dna-vanilla-batch", type=int, default=128, help="(a) sequences per padded batch")
    p.add_argument("--dna-sorted-tokens", type=int, default=65536, help="(b) padded tokens per batch")
    p.add_argument("--attention", default="auto",
                   help="DNABERT-S (c): comma-separated attention backends to run, each a separate (c) run "
                        "(auto | padded | flex | triton; auto: the runtime's "
                        "defaults, on CUDA our attention kernel; the others pin the attention with "
                        "kernels=torch: triton = our varlen ALiBi kernel), e.g. padded,flex,triton,auto; any "
                        "entry may end in @TOKENS, a token budget (e.g. auto@32768)")
    p.add_argument("--esm-rotary", default="auto",
                   help="ESM-2 (c): comma-separated rotary implementations, each a separate (c) run: auto "
                        "(key c: the runtime's defaults), torch (c_torch: fused by Inductor), triton (c_triton: "
                        "the hand-written kernel, kernels_rotary.py; needs the triton package and CUDA, else "
                        "skipped with the reason printed), eager (the defaults not compiled), flash (the defaults "
                        "with flash attention); any entry may end in @TOKENS, a token budget (e.g. auto@32768)")
    p.add_argument("--attention-tiling", default=None,
                   help="DNABERT-S attention kernel tiling block_m,block_n,num_warps (default kernels_attention's)")
    p.add_argument("--esm-attention-tiling", default=None,
                   help="ESM-2 attention kernel tiling (no bias) block_m,block_n,num_warps")
    p.add_argument("--tilings-from", type=Path, default=None,
                   help="perf/bench_kernels.py's JSON: use its fastest correct attention tilings, with and "
                        "without bias (at its largest token count); --attention-tiling, --esm-attention-tiling "
                        "override")
    p.add_argument("--skip-eager", action="store_true",
                   help="skip the (c_eager) run that comes first on CUDA when compiling")
    p.add_argument("--fp32-ref-seqs", type=int, default=640,
                   help="sequences embedded in fp32 (PyTorch eager) as the reference of every (c) run's "
                        "min/mean cosine (column cos~fp32; 0: none)")
    p.add_argument("--skip-vanilla", action="store_true",
                   help="skip the slow fp32 vanilla runs (a) (same as --esm-vanilla-seqs 0 --dna-vanilla-seqs 0)")
    p.add_argument("--profile", action="store_true", help="print each (c) run's top CUDA kernels (torch.profiler)")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="with --profile: write each profiled (c) run's Chrome trace here (<key>.json.gz)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    sizes = {"esm_seqs": (6000, 48), "esm_vanilla_seqs": (640, 16), "dna_seqs": (40000, 96),
             "dna_vanilla_seqs": (4096, 32)}
    for name, (full, small) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    if args.skip_vanilla:
        args.esm_vanilla_seqs = args.dna_vanilla_seqs = 0
    bad = [b for b in args.attention.split(",")
           if variant_name(b) not in ("auto", "padded", "flex", "triton") + FP8_PLANS]
    if bad:
        raise SystemExit(f"bench_models: --attention takes auto, padded, flex, triton, fp8, fp8-smooth, fp8-ffn "
                         f"(comma-separated), got {bad}")
    bad = [r for r in args.esm_rotary.split(",") if variant_name(r) not in ESM_VARIANTS]
    if bad:
        raise SystemExit(f"bench_models: --esm-rotary takes {', '.join(ESM_VARIANTS)} (comma-separated, each "
                         f"optionally @TOKENS), got {bad}")
    if args.small:
        args.esm_vanilla_batch = min(args.esm_vanilla_batch, 8)
        args.dna_vanilla_batch = min(args.dna_vanilla_batch, 16)
    return args


def print_table(results: list, device_name: str) -> None:
    print(f"\nbench_models on {device_name}")
    print(f"{'model':10} {'path':69} {'seqs':>6} {'tokens':>9} {'s':>7} {'tokens/s':>11} {'peak GiB':>8} "
          f"{'cos~(b)':>8} {'cos~fp32 min/mean':>17}")
    for r in results:
        for key, run in r["runs"].items():
            if "error" in run:
                print(f"{r['model']:10} {'(' + key + ')':11} {run['path'][:57]:57} FAILED: {run['error'][:60]}")
                continue
            peak = f"{run['peak_gib']:8.1f}" if "peak_gib" in run else f"{'-':>8}"
            cos = f"{run['min_cos_b']:8.5f}" if "min_cos_b" in run else f"{'':8}"
            if "cos_fp32" in run:
                cos += f" {run['cos_fp32']['min']:8.5f}/{run['cos_fp32']['mean']:.5f}"
            flag = "" if run["finite"] else "  NON-FINITE"
            if run.get("graphs_compiled_warm"):
                flag += f"  [warm-up {run['warm_s']:.0f} s, {run['graphs_compiled_warm']} graphs]"
            if run.get("recompiles"):
                flag += f"  RECOMPILED {run['recompiles']}x WHILE TIMED"
            best = "*" if key == r["best_c"] else " "
            print(f"{r['model']:10} {'(' + key + ')' + best:11} {run['path'][:57]:57} {run['sequences']:6d} "
                  f"{run['tokens']:9d} {run['seconds']:7.2f} {run['tokens_per_s']:11,.0f} {peak} {cos}{flag}")
        cos, ratios = r["min_cosine"], r["ratios"]
        vs_a = (f"(c)/(a) = {ratios['c_over_a']:.1f}x   " if ratios["c_over_a"] is not None else "")
        cos_a = f"(c)~(a) {cos['c_vs_a']:.5f}, " if cos["c_vs_a"] is not None else ""
        print(f"{'':10} (c) = ({r['best_c']}): (c)/(b) = {ratios['c_over_b']:.2f}x   {vs_a}"
              f"min cosine {cos_a}(c)~(b) {cos['c_vs_b']:.5f}   [{r['forward_passes']} forwards]")


def targets(results: list) -> dict:
    met = {}
    for r in results:
        fp8 = r["runs"].get("c_fp8", {})
        if r["model"] == "esm2":
            met["esm2_c_over_b"] = {"target": TARGETS["esm2_c_over_b"], "value": round(r["ratios"]["c_over_b"], 3)}
            if "tokens_per_s" in fp8:
                met["esm2_fp8_over_c"] = {"target": TARGETS["esm2_fp8_over_c"], "value": round(
                    fp8["tokens_per_s"] / r["runs"][r["best_c"]]["tokens_per_s"], 3)}
        else:
            met["dnabert_s_c_tokens_per_s"] = {"target": TARGETS["dnabert_s_c_tokens_per_s"],
                                               "value": round(r["runs"][r["best_c"]]["tokens_per_s"])}
            if "tokens_per_s" in fp8:
                met["dnabert_s_fp8_tokens_per_s"] = {"target": TARGETS["dnabert_s_fp8_tokens_per_s"],
                                                     "value": round(fp8["tokens_per_s"])}
    for v in met.values():
        v["met"] = v["value"] >= v["target"]
    return met


def run(args: argparse.Namespace) -> int:
    args = defaults(args)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the runtime logs its choices
    core = import_core()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"esm2", "dnabert_s"}
    if unknown:
        print(f"bench_models: unknown model(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the vanilla path
    set_kernel_tilings(args)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results = []
    for m in models:
        results.append((bench_esm2 if m == "esm2" else bench_dnabert_s)(core, args, device, dtype))
    print_table(results, device_name)
    met = targets(results) if not args.small else {}
    for name, v in met.items():
        print(f"target {name}: {v['value']:,} (>= {v['target']:,}): {'met' if v['met'] else 'NOT met'}")
    report = {"device": device_name, "torch": torch.__version__, "small": args.small, "dtype": args.dtype,
              "transformers": package_version("transformers"), "results": results, "targets": met,
              "argv": sys.argv[1:]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    bad = [r["model"] for r in results for run_ in r["runs"].values() if not run_.get("finite", False)]
    return 1 if bad else 0


def package_version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # not installed: the field says so
        return "absent"


def set_kernel_tilings(args: argparse.Namespace) -> None:
    """--attention-tiling / --esm-attention-tiling (or --tilings-from): the attention kernel's
    module defaults (with the ALiBi bias: DNABERT-S; without: ESM-2) for this process."""
    keys = ("block_m", "block_n", "num_warps")
    if args.tilings_from:
        rows = json.loads(args.tilings_from.read_text())["rows"]
        top = max(r["tokens"] for r in rows)
        for kernel, name in (("attention", "attention_tiling"), ("attn_esm2", "esm_attention_tiling")):
            ok = [r for r in rows if r["kernel"] == kernel and r["tokens"] == top and "tiling" in r
                  and r["rel_error"] < 2e-2]
            if ok and not getattr(args, name):
                best = min(ok, key=lambda r: r["us"])["tiling"]
                setattr(args, name, ",".join(str(best[k]) for k in keys))
    from embed_core import kernels_attention
    for has_bias, name in ((True, "attention_tiling"), (False, "esm_attention_tiling")):
        if getattr(args, name):
            block_m, block_n, warps = (int(v) for v in getattr(args, name).split(","))
            kernels_attention.TILINGS[has_bias] = (block_m, block_n, warps)
            print(f"bench_models: attention kernel tiling {'with' if has_bias else 'without'} bias "
                  f"{block_m}x{block_n}, {warps} warps")


def main() -> None:
    sys.exit(run(build_parser().parse_args()))


if __name__ == "__main__":
    main()
