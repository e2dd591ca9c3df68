"""Reading and writing checkpoint tensors, and the one strict loader both encoders use.

Every loader maps the file's tensor names to the encoder's own (native) names first; then
`load_strict` compares them against the encoder's state dict and names every missing,
unexpected and mis-shaped tensor in one CheckpointError, before any weight is assigned.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Union

import torch
from torch import nn

from .errors import CheckpointError

PathLike = Union[str, Path]
SAFETENSORS_FILE, TORCH_FILE = "model.safetensors", "pytorch_model.bin"


def torch_load(file: Path, allow_pickle: bool = False) -> Any:
    """torch.load on CPU, weights only (plus argparse.Namespace, where fair-esm keeps its cfg)
    unless allow_pickle; memory-mapped where the file allows it."""
    if allow_pickle:
        return torch.load(str(file), map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise  # legacy (non-zip) files cannot be memory-mapped: read them whole
                return torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: holds pickled objects other than tensors and argparse.Namespace, which "
            f"torch.load(weights_only=True) refuses ({str(e).splitlines()[0]}). Pass allow_pickle=True "
            "only for a file you trust, or re-save it as {'model': state_dict, 'cfg': {'model': {...}}}."
        ) from None


def read_tensor_file(file: Path) -> Dict[str, torch.Tensor]:
    """The flat state dict of one .safetensors or torch file; CheckpointError naming the file otherwise."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file), device="cpu")
        else:
            state = torch_load(file)
    except Exception as e:  # corrupt, truncated, or holding pickled objects: name the file
        raise CheckpointError(f"{file}: cannot be read: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a flat state dict of tensors, found {type(state).__name__}")
    return dict(state)


def read_hf_tensors(folder: Path) -> tuple[Dict[str, torch.Tensor], Path]:
    """All tensors of a HF folder's model.safetensors or pytorch_model.bin (sharded through its
    *.index.json or not), and the file (or index) they came from."""
    for name in (SAFETENSORS_FILE, TORCH_FILE):
        single, index = folder / name, folder / f"{name}.index.json"
        if single.is_file():
            return read_tensor_file(single), single
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            tensors: Dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(read_tensor_file(folder / shard))
            return tensors, index
    raise CheckpointError(f"{folder}: no {SAFETENSORS_FILE} or {TORCH_FILE} (or a sharded *.index.json)")


def write_hf_tensors(state: Mapping[str, torch.Tensor], folder: Path, safetensors: bool) -> Path:
    """Writes `state` as the folder's model.safetensors (tied tensors become copies: safetensors
    refuses shared storage) or pytorch_model.bin; returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    if safetensors:
        from safetensors.torch import save_file
        file = folder / SAFETENSORS_FILE
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})
    else:
        file = folder / TORCH_FILE
        torch.save(dict(state), file)
    return file


def load_strict(build: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor], mismatch: str,
                checkpoint_name: Callable[[str], str] = lambda native: native,
                unexpected: Iterable[str] = (), extra_problems: Iterable[str] = ()) -> nn.Module:
    """The module `build()` makes (on the meta device) with `tensors` (native names) assigned,
    float32, eval, no grad; or one CheckpointError listing every problem.

    `checkpoint_name` turns a native name back into the file's name for the message;
    `unexpected` are file names the caller's mapping already refused; `extra_problems` are
    further lines (e.g. a rotary table that does not match). `mismatch` is the message's first
    line: the file and what it was expected to hold.
    """
    with torch.device("meta"):
        model = build()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    lines = [f"  missing: {checkpoint_name(n)}" for n in expected if n not in tensors]
    lines += [f"  unexpected: {n}" for n in unexpected]
    lines += [f"  unexpected: {checkpoint_name(n)}" for n in tensors if n not in expected]
    lines += [f"  wrong shape: {checkpoint_name(n)}: checkpoint {list(t.shape)}, model {list(expected[n])}"
              for n, t in tensors.items() if n in expected and tuple(t.shape) != expected[n]]
    lines += [f"  {problem}" for problem in extra_problems]
    if lines:
        raise CheckpointError(f"{mismatch}:\n" + "\n".join(lines))
    state = {n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()
