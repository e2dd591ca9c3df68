"""Fixtures for the server tests: the model core as the reference, and test sequences."""
from __future__ import annotations

import random

import pytest

PROTEIN = "ACDEFGHIKLMNPQRSTVWY"
DNA = "ACGT"


def random_sequences(model: str, count: int, seed: int, lo: int = 5, hi: int = 0) -> list:
    """`count` sequences of mixed lengths in the model's alphabet (some lower-case, some N)."""
    rng = random.Random(seed)
    letters = PROTEIN if model == "esm2" else DNA
    hi = hi or (150 if model == "esm2" else 500)
    out = []
    for i in range(count):
        s = "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))
        if i % 7 == 3:
            s = s.lower()
        if model == "dnabert_s" and i % 5 == 2:
            s = s[: len(s) // 2] + "N" + s[len(s) // 2 + 1:]
        out.append(s)
    return out


@pytest.fixture(scope="session")
def make_sequences():
    """make_sequences(model, count, seed, lo=5, hi=0): see random_sequences."""
    return random_sequences


@pytest.fixture(scope="session")
def reference(demo_checkpoints):
    """reference(model) -> the model core's Embedder on CPU in float32, same checkpoint."""
    from embed_core.models import load_embedder
    from embed_core.runtime import RuntimeConfig

    cache = {}

    def get(model: str):
        if model not in cache:
            cache[model] = load_embedder(model, demo_checkpoints / model, RuntimeConfig(device="cpu", dtype="float32"))
        return cache[model]

    return get
