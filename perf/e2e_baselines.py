"""perf/e2e.py's baselines, on GPU 0 once the server is gone: the model core in-process on the same
frames (the ceiling the server is measured against) and transformers' EsmModel (the plain fast path),
each shrunk to what --budget-s leaves."""
from __future__ import annotations

import time
from typing import Optional

from e2e_checkpoints import build_model
from e2e_common import MODELS, Scenario, load_perf_module, log
from e2e_options import inprocess_overrides

SEQUENCE_FIELD = {"esm2": "protein", "dnabert_s": "nucleotide"}   # what each model embeds of a frame


def model_seed(seed: int, m: str) -> int:
    """The weight seed of model `m` (write_checkpoints' seeds: the server's weights)."""
    return seed if m == "esm2" else seed + 1


def tokenizer_for(s: Scenario, m: str):
    """The tokenizer the server uses for `m` (DNABERT-S: the run's trained tokenizer.json)."""
    from embed_core.dnabert_s_tokenizer import DnabertTokenizer
    from embed_core.esm2_tokenizer import Esm2Tokenizer
    return Esm2Tokenizer() if m == "esm2" else DnabertTokenizer.from_file(s.workdir / "checkpoints" / "tokenizer.json")


def embed_in_process(s: Scenario, m: str, seed: int, sequences: list) -> tuple:
    """(figures, rows, model): one model, built with the server's weights (same seed), in an Embedder
    with the server's runtime policy on `sequences`, timed after its warm-up, tokenization included
    (the server tokenizes in execute too)."""
    import numpy as np
    from embed_core.models import DEFAULT_MAX_LENGTH
    from embed_core.runtime import Embedder, RuntimeConfig
    bm = load_perf_module("bench_models")
    t0 = time.perf_counter()
    model = build_model(m, s.dims[m], s.device, seed)
    tokenizer = tokenizer_for(s, m)
    overrides = inprocess_overrides(s.args.model_params.get(m, {}))   # the server's kernel choices
    embedder = Embedder(model, tokenizer, RuntimeConfig(device=str(s.device), max_length=DEFAULT_MAX_LENGTH[m],
                                                        **overrides))
    embedder.warmup()
    embedder.embed(sequences[:max(16, len(sequences) // 20)])   # warm: kernels for these lengths
    bm.sync(s.device)
    setup_s = time.perf_counter() - t0
    before = embedder.stats.as_dict()
    t0 = time.perf_counter()
    rows = embedder.embed(sequences)
    bm.sync(s.device)
    seconds = time.perf_counter() - t0
    after = embedder.stats.as_dict()
    tokens = after["tokens"] - before["tokens"]
    figures = {"sequences": len(sequences), "tokens": int(tokens), "seconds": seconds,
               "tokens_per_s": tokens / seconds, "setup_s": setup_s,
               "token_budget": embedder.token_budget, "compiled": embedder.plan.compiled, "plan": embedder.plan.describe(),
               "dtype": bm.name_of(embedder.dtype), "runtime_overrides": overrides,
               "forward_passes": after["forward_passes"] - before["forward_passes"],
               "finite": bool(np.isfinite(rows).all())}
    log(f"in-process {m}: {len(sequences):,} frames, {tokens:,} tokens in {seconds:.1f} s "
        f"= {tokens / seconds:,.0f} tokens/s (setup {setup_s:.0f} s, budget {embedder.token_budget})")
    embedder.close()
    return figures, rows, model


def inprocess_baseline(s: Scenario, frames: list) -> tuple:
    """The model core in-process on the same frames (both models, one device, the server's weights:
    same seeds). Returns (figures and the first rows per model, the ESM-2 model, whose weights seed
    the transformers baseline)."""
    bm = load_perf_module("bench_models")
    out = {"frames": len(frames), "models": {}}
    esm_model = None
    for m in MODELS:
        figures, rows, model = embed_in_process(s, m, model_seed(s.args.seed, m), [getattr(f, SEQUENCE_FIELD[m]) for f in frames])
        out["models"][m] = figures
        out.setdefault("rows", {})[m] = rows[:s.args.check_rows]
        if m == "esm2":
            esm_model = model
        del model
        bm.free_memory(s.device)
    out["frames_per_s"] = len(frames) / sum(v["seconds"] for v in out["models"].values())
    return out, esm_model


def transformers_baseline(s: Scenario, frames: list, ours) -> dict:
    """transformers' EsmModel bf16 (fp32 on CPU) SDPA, length-sorted padded batches of <= 16,384 tokens:
    the plain fast path (bench_models' (b)), on `frames` (a prefix of the run's), with our weights."""
    import numpy as np
    import torch
    from embed_core.esm2_tokenizer import Esm2Tokenizer
    from transformers import EsmModel
    bm = load_perf_module("bench_models")
    device = s.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    hf_config = bm.hf_esm_config(ours.config, s.dims["esm2"])
    bm.set_attention(None, hf_config, "sdpa")
    with torch.device(device):
        hf = EsmModel(hf_config, add_pooling_layer=False)
    hf.to(dtype)
    bm.copy_weights(ours, hf)
    hf.eval()
    attn = bm.set_attention(hf, hf_config, "sdpa")
    tokenizer = Esm2Tokenizer()
    work = [tokenizer.encode(f.protein) for f in frames]
    warm = work[:max(8, len(work) // 16)]
    forward = lambda ids, mask: hf(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    run = bm.padded_runner(forward, 1, (1, 1),
                           lambda w: bm.sorted_batches(np.array([len(t) for t in w]), 16384), device)
    setup_s = time.perf_counter() - t0
    result, rows = bm.measure(f"transformers EsmModel {bm.name_of(dtype)} {attn}, length-sorted",
                              run, work, warm, device)
    result["setup_s"] = setup_s
    result["rows"] = rows[:s.args.check_rows]
    log(f"transformers ESM-2: {len(work):,} frames, {result['tokens']:,} tokens in {result['seconds']:.1f} s "
        f"= {result['tokens_per_s']:,.0f} tokens/s")
    del hf, run
    bm.free_memory(device)
    return result


def min_cosine(a, b) -> Optional[float]:
    import numpy as np
    if a is None or b is None or len(a) == 0 or a.shape != b.shape:
        return None
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(1)
    return float((num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)).min())


def budgeted_frames(s: Scenario, frames: list) -> list:
    """The frames for the in-process baseline: all of them (or --inprocess-frames), fewer when the time
    left under --budget-s would not hold them (estimated from the Triton run's own speed)."""
    args, f = s.args, s.report["figures"]
    n = len(frames) if not args.inprocess_frames else min(len(frames), args.inprocess_frames)
    left = s.seconds_left()
    per_frame = 1.0 / f["e2e_frames_per_s_per_gpu"] if f.get("e2e_frames_per_s_per_gpu") else None
    fixed = 30.0 if args.small else 150.0   # model builds, compilation, the transformers subsample
    if per_frame and not args.small and n * per_frame + fixed > left:
        fit = max(2000, int((left - fixed) / per_frame))
        if fit < n:
            s.report["notes"].append(f"in-process baseline on the first {fit:,} of {len(frames):,} frames "
                                     f"(--budget-s {args.budget_s:.0f}: {left:.0f} s left)")
            n = fit
    return frames[:n]


def inprocess_phase(s: Scenario, frames: list, e2e_rows: dict) -> tuple:
    """The in-process phase: its figures, the overhead of the server and client over it, and the
    cosine between the embeddings the client wrote and the in-process ones."""
    f = s.report["figures"]
    t0 = time.monotonic()
    inproc, esm_model = inprocess_baseline(s, budgeted_frames(s, frames))
    s.phase("in_process", t0)
    for m in MODELS:
        f[f"inprocess_{m}_tokens_per_s"] = inproc["models"][m]["tokens_per_s"]
    f["inprocess_frames_per_s"] = inproc["frames_per_s"]
    f["inprocess_frames"] = inproc["frames"]
    s.report["inprocess"] = {k: v for k, v in inproc.items() if k != "rows"}
    if f.get("e2e_frames_per_s_per_gpu"):
        f["e2e_over_inprocess"] = f["e2e_frames_per_s_per_gpu"] / f["inprocess_frames_per_s"]
        f["overhead"] = 1 - f["e2e_over_inprocess"]
    s.report["cosine"] = {f"{m} e2e~in-process": min_cosine(e2e_rows[m][:len(inproc["rows"][m])], inproc["rows"][m])
                          for m in MODELS}
    s.save()
    return inproc, esm_model


def transformers_frames(s: Scenario, frames: list) -> int:
    """How many frames the transformers baseline gets: --hf-frames, fewer to fit the time left (room
    for its setup, then frames at half our in-process ESM-2 speed), none below 256."""
    args, f = s.args, s.report["figures"]
    hf_frames = min(args.hf_frames, len(frames))
    left = s.seconds_left()
    if not args.small:
        frame_tokens = s.report["workload"]["esm2_tokens"] / max(1, len(frames))
        fit = int(max(0.0, left - 40) * 0.5 * f["inprocess_esm2_tokens_per_s"] / frame_tokens)
        if fit < hf_frames:
            hf_frames = fit if fit >= 256 else 0
            s.report["notes"].append(f"transformers baseline on {hf_frames:,} frames, not {args.hf_frames:,} "
                                     f"({left:.0f} s left of --budget-s {args.budget_s:.0f})")
            log(s.report["notes"][-1])
    return hf_frames


def run_baselines(s: Scenario, frames: list, e2e_rows: dict) -> None:
    """The in-process ceiling and the transformers baseline, each shrunk (or skipped, with a note) to
    what the time left under --budget-s holds."""
    f, notes = s.report["figures"], s.report["notes"]
    left = s.seconds_left()
    if not s.args.small and left < 100:
        notes.append(f"baselines skipped: {left:.0f} s left of --budget-s {s.args.budget_s:.0f}")
        log(notes[-1])
        return
    inproc, esm_model = inprocess_phase(s, frames, e2e_rows)
    hf_frames = transformers_frames(s, frames)
    if not hf_frames:
        return
    t0 = time.monotonic()
    hf = transformers_baseline(s, frames[:hf_frames], esm_model)
    del esm_model
    s.phase("transformers", t0)
    f["hf_esm2_tokens_per_s"] = hf["tokens_per_s"]
    f["hf_esm2_frames"] = hf["sequences"]
    f["inprocess_over_hf_esm2"] = f["inprocess_esm2_tokens_per_s"] / hf["tokens_per_s"]
    n = min(len(hf["rows"]), len(inproc["rows"]["esm2"]))
    s.report["cosine"]["esm2 transformers~in-process"] = min_cosine(hf["rows"][:n], inproc["rows"]["esm2"][:n])
    s.report["transformers"] = {k: v for k, v in hf.items() if k != "rows"}
