"""perf/e2e.py's checkpoints: random encoders at the real sizes (or demo sizes with --small), written
in the published layouts, and the model repository the server loads."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict

from e2e_common import MODELS, Scenario, load_perf_module, log
from e2e_options import instances_text


def model_dims(small: bool) -> dict:
    bm = load_perf_module("bench_models")
    return {"esm2": dict(bm.ESM2_SMALL if small else bm.ESM2_3B),
            "dnabert_s": dict(bm.DNABERT_S_SMALL if small else bm.DNABERT_S_FULL)}


def build_model(kind: str, dims: dict, device, seed: int):
    """A random encoder at `dims`, built directly on `device` (fast at 3B), fp32, eval.
    The same seed on the same device gives the same weights (the server's = the in-process ones)."""
    import torch
    bm = load_perf_module("bench_models")
    if kind == "esm2":
        from embed_core.esm2 import ESM2, Esm2Config
        with torch.device(device):
            model = ESM2(Esm2Config(**dims))
        bm.random_init_(model, seed=seed, std=lambda name, p: 0.02)
    else:
        from embed_core.dnabert_s import DnabertS, DnabertSConfig
        with torch.device(device):
            model = DnabertS(DnabertSConfig(**dims))
        bm.random_init_(model, seed=seed, std=bm.dnabert_std)
    return model.eval()


def write_esm2_fast(model, out_dir: Path) -> Path:
    """The published HF ESM-2 layout (`esm.`-prefixed encoder tensors, config.json, vocab.txt) in the
    model's own dtype: bf16 halves what embed_core.esm2_checkpoint.write_hf_checkpoint (fp32 always, plus the
    unused lm_head/contact head) writes; load_esm2 reads it (it converts to fp32 and recomputes the
    rotary inv_freq, as it does for any checkpoint without one)."""
    from safetensors.torch import save_file
    from embed_core.esm2_tokenizer import Esm2Tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"esm.{name}": t.detach().to("cpu").contiguous()
             for name, t in model.state_dict().items() if not name.endswith("inv_freq")}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(model.config.to_hf_json(), indent=2, sort_keys=True) + "\n")
    (out_dir / "vocab.txt").write_text("\n".join(Esm2Tokenizer.TOKENS) + "\n")
    return out_dir


def write_checkpoints(args, dims: dict, device, workdir: Path) -> tuple:
    """({model: checkpoint folder}, {model: seconds to build and write}); the tokenizer.json lands in
    checkpoints/."""
    import torch
    from embed_core.dnabert_s_tokenizer import train_demo_tokenizer
    from embed_core.dnabert_s_checkpoint import write_hf_checkpoint as write_dnabert_s
    from embed_core.esm2_checkpoint import write_hf_checkpoint as write_esm2_core
    bm = load_perf_module("bench_models")
    seconds, paths = {}, {}
    t0 = time.perf_counter()
    model = build_model("esm2", dims["esm2"], device, args.seed)
    if device.type == "cuda":
        model.to(torch.bfloat16)   # the server computes in bf16 on this GPU: nothing lost, half the bytes
    if args.esm_writer == "core":
        paths["esm2"] = write_esm2_core(model, workdir / "checkpoints" / "esm2")
    else:
        paths["esm2"] = write_esm2_fast(model, workdir / "checkpoints" / "esm2")
    del model
    bm.free_memory(device)
    seconds["esm2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer_json = train_demo_tokenizer(workdir / "checkpoints" / "tokenizer.json",
                                          vocab_size=dims["dnabert_s"]["vocab_size"], seed=args.seed)
    model = build_model("dnabert_s", dims["dnabert_s"], device, args.seed + 1)
    paths["dnabert_s"] = write_dnabert_s(model, tokenizer_json, workdir / "checkpoints" / "dnabert_s",
                                         safetensors=True)
    del model
    bm.free_memory(device)
    seconds["dnabert_s"] = time.perf_counter() - t0
    return paths, seconds


def write_repository(args, dims: dict, paths: dict, out: Path, parameters: dict) -> Path:
    """The model repository at `out` on the checkpoints at `paths` ({model: folder}), with the
    config parameters {model: {key: value}}."""
    from embed_server.repository import assemble_repository
    # --small runs the CPU configs: there --instances-per-gpu sets the CPU instances, so the knob
    # is exercised by the smoke run too.
    return assemble_repository(out, paths, symlink=True, embedding_dims={m: dims[m]["hidden_size"] for m in paths},
                               cpu_instances=(args.instances_per_gpu if isinstance(args.instances_per_gpu, int)
                                              else 1) if args.small else None,
                               gpu_instances=args.instances_per_gpu, parameters=parameters)


def configured_instances(repo: Path, small: bool) -> Dict[str, int]:
    """{model: instances per GPU (CPU instances with --small)} as the assembled configs say."""
    from embed_server.repository import instance_count
    config = "configs/cpu.pbtxt" if small else "config.pbtxt"
    return {m: instance_count((repo / m / config).read_text()) for m in MODELS}


def repository_phase(s: Scenario) -> Path:
    """The checkpoints phase: the model repository, its instance counts in the report."""
    t0 = time.monotonic()
    s.checkpoints, ck_seconds = write_checkpoints(s.args, s.dims, s.device, s.workdir)
    repo = write_repository(s.args, s.dims, s.checkpoints, s.workdir / "repository", s.args.model_params)
    instances = s.report["config"]["instances"] = configured_instances(repo, s.args.small)
    if any(n > 1 for n in instances.values()):
        s.report["notes"].append(f"instances per GPU {instances_text(instances)}: execution-time figures of a "
                                 "model with several (busy s, tokens/s per exec time, server execute s) sum "
                                 "instances that overlap on a GPU; its target figure is then tokens over wall time")
    s.report["config"]["checkpoint_seconds"] = ck_seconds
    s.phase("checkpoints", t0)
    log("checkpoints: " + ", ".join(f"{m} {sec:.0f} s" for m, sec in ck_seconds.items()) + f" -> {repo}")
    return repo
