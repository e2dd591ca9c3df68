"""One entry point per model kind: load an (encoder, tokenizer) pair, or a ready Embedder."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

from .alphabets import DEFAULT_MAX_LENGTH, MODEL_KINDS  # noqa: F401  (DEFAULT_MAX_LENGTH: the core's name for it)
from .runtime import Embedder, RuntimeConfig


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")


def load_model(kind: str, path: Union[str, Path]):
    """(encoder, tokenizer) from a checkpoint: a HF directory, or for esm2 also a fair-esm .pt."""
    _check_kind(kind)
    if kind == "esm2":
        from .esm2_checkpoint import load_esm2
        return load_esm2(path)
    from .dnabert_s_checkpoint import load_dnabert_s
    return load_dnabert_s(path)


def load_embedder(kind: str, path: Union[str, Path], config: RuntimeConfig = RuntimeConfig()) -> Embedder:
    """An Embedder for the checkpoint at `path`, with the model's default max_length unless set."""
    _check_kind(kind)
    encoder, tokenizer = load_model(kind, path)
    if config.max_length is None:
        config = dataclasses.replace(config, max_length=DEFAULT_MAX_LENGTH[kind])
    return Embedder(encoder, tokenizer, config)
