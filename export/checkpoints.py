"""Checkpoint sources (a local HF folder, a fair-esm .pt, a hub id) and their validation.

A checkpoint is valid when the model core loads it completely (every tensor present and
of the right shape, the tokenizer consistent) and a short probe sequence embeds to finite
numbers. Export validates every checkpoint before it writes anything.
"""
from __future__ import annotations

import dataclasses
import gc
import re
from pathlib import Path
from typing import Optional, Sequence, Union

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# Weights and files no loader of ours reads: never download them.
HUB_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "tf_model*", "flax_model*",
              "rust_model*", "coreml/*", "onnx/*", "openvino/*", "*.gguf"]
# A probe per model kind: embedding it exercises tokenizer + encoder + pooling end to end.
PROBES = {"esm2": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "dnabert_s": "ACGTTGCANNGATCCGTACGTAGCTAGCTTAGC"}


class ExportError(Exception):
    """Export cannot proceed; the message says what and where (the CLI exits 1 with it)."""


@dataclasses.dataclass(frozen=True)
class ValidCheckpoint:
    """A checkpoint the model core loaded completely."""

    kind: str
    path: Path
    hidden_size: int
    parameters: int


def resolve_source(source: str, cache_dir: Optional[Path] = None) -> Path:
    """A local path as is; otherwise a hub id ("org/name") downloaded with huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not HUB_ID.fullmatch(source):
        raise ExportError(f"{source}: no such file or directory")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise ExportError(f"{source} is not a local path; to download it from the Hugging Face hub "
                          "install huggingface_hub (pip install huggingface_hub)") from None
    try:
        files = HfApi().list_repo_files(source)
        ignore = list(HUB_IGNORE)
        if any(f.endswith(".safetensors") for f in files):  # the loaders prefer safetensors
            ignore += ["*.bin", "*.pt"]
        print(f"embed-export: downloading {source} from the Hugging Face hub", flush=True)
        return Path(snapshot_download(source, cache_dir=cache_dir, ignore_patterns=ignore))
    except Exception as err:  # offline, unknown repo, gated, disk full: one clear message
        raise ExportError(
            f"{source}: not a local path, and downloading it from the Hugging Face hub failed "
            f"({type(err).__name__}: {err}). Offline? Download it where you are online "
            f"(hf download {source} --local-dir DIR) and pass DIR."
        ) from None


def check_out_dir(out: Path, force: bool) -> None:
    """ExportError when `out` exists and is not an empty folder, unless `force` (it will be replaced)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out} exists and is not empty (use --force to replace it)")


def load_checked(kind: str, path: Path):
    """load_model(kind, path) with its failures as ExportError naming the checkpoint."""
    from embed_core import CheckpointError, load_model

    try:
        return load_model(kind, path)
    except CheckpointError as err:
        raise ExportError(f"{kind} checkpoint {path} is not valid: {err}") from None
    except (OSError, ValueError) as err:
        raise ExportError(f"{kind} checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from None


def validate_checkpoint(kind: str, path: Path) -> ValidCheckpoint:
    """Load `path` fully with the model core and embed a probe; ExportError naming the problem."""
    import numpy as np
    import torch
    from embed_core import Embedder, RuntimeConfig

    encoder, tokenizer = load_checked(kind, path)
    with torch.no_grad():
        bad = [name for name, tensor in encoder.state_dict().items()
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ExportError(f"{kind} checkpoint {path} has NaN or Inf values in: {', '.join(bad)}")
    embedder = Embedder(encoder, tokenizer, RuntimeConfig(device="cpu", dtype="float32", token_budget=1024))
    try:
        probe = embedder.embed([PROBES[kind]])
    finally:
        embedder.close()
    if probe.shape != (1, embedder.hidden_size) or not bool(np.isfinite(probe).all()):
        raise ExportError(f"{kind} checkpoint {path}: the probe sequence embeds to shape "
                          f"{probe.shape} with non-finite values")
    result = ValidCheckpoint(kind, Path(path), int(encoder.hidden_size),
                             sum(t.numel() for t in encoder.state_dict().values()))
    del embedder, encoder
    gc.collect()
    return result


def plans_for(kind: str) -> tuple:
    """The fp8 plans model `kind` can run, fastest first (fp8.runnable_plans)."""
    from embed_core.dnabert_s import DnabertS
    from embed_core.esm2 import ESM2
    from embed_core.fp8 import runnable_plans
    return runnable_plans({"esm2": ESM2, "dnabert_s": DnabertS}[kind])


def check_fp8(kind: str, path: Union[str, Path], plans: Sequence[str] = ("fp8", "fp8-ffn"),
              sequences: Optional[Sequence[str]] = None, threshold: Optional[float] = None,
              device: str = "auto", token_budget: Optional[int] = None) -> list:
    """embed-export check-fp8: each plan's Fp8Check on the checkpoint at `path` (no exception for a
    plan below the threshold: the caller prints and decides). The checkpoint is loaded once and
    its fp32 reference computed once; the plans take turns on it (fp8_gate.switch)."""
    from embed_core import RuntimeConfig, load_embedder
    from embed_core.fp8 import DEFAULT_MIN_COSINE
    from embed_core.fp8_gate import CHECK_SEQUENCES, bundled_sequences, measure, reference_embeddings, switch
    threshold = DEFAULT_MIN_COSINE if threshold is None else threshold
    embedder = load_embedder(kind, path, RuntimeConfig(device=device, dtype=plans[0], token_budget=token_budget,
                                                       fp8_min_cosine=threshold))
    try:
        arrays = embedder.tokenize(list(sequences) if sequences is not None
                                   else bundled_sequences(kind, CHECK_SEQUENCES))
        reference = reference_embeddings(embedder, arrays)
        checks = []
        for plan in plans:
            switch(embedder, plan)
            checks.append(measure(embedder, arrays, threshold, reference))
    finally:
        embedder.close()
    return checks
