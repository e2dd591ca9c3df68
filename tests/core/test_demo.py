"""The demo checkpoints load back through the public loaders, in every published layout."""
from __future__ import annotations

import json

import numpy as np
import pytest

from embed_core import RuntimeConfig, load_embedder, load_model
from embed_core.demo import DEMO_DNABERT_S, DEMO_ESM2

PROTEINS = ["MKTAYIAKQRQISFVKSHFSRQ", "LAGV", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]
DNA = ["ACGTTGCAAGGCTTAACGGTACGTAGCTAGCTAGGATCCA", "NNACGTRYACGT", "ACGT" * 40]


def test_layout(demo_checkpoints):
    dnabert = demo_checkpoints / "dnabert_s"
    esm = demo_checkpoints / "esm2"
    assert {"config.json", "tokenizer.json"} <= {p.name for p in dnabert.iterdir()}
    assert {"config.json", "vocab.txt"} <= {p.name for p in esm.iterdir()}
    assert (demo_checkpoints / "esm2_fair.pt").is_file()
    assert json.loads((dnabert / "config.json").read_text())["hidden_size"] == DEMO_DNABERT_S["hidden_size"]
    assert json.loads((esm / "config.json").read_text())["architectures"] == ["EsmForMaskedLM"]


def test_esm2_hf_and_fair_esm_give_identical_embeddings(demo_checkpoints):
    config = RuntimeConfig(device="cpu", dtype="float32")
    hf = load_embedder("esm2", demo_checkpoints / "esm2", config).embed(PROTEINS)
    fair = load_embedder("esm2", demo_checkpoints / "esm2_fair.pt", config).embed(PROTEINS)
    assert hf.shape == (len(PROTEINS), DEMO_ESM2["hidden_size"]) and hf.dtype == np.float32
    assert np.isfinite(hf).all()
    np.testing.assert_array_equal(hf, fair)


def test_dnabert_s_loads_and_embeds(demo_checkpoints):
    encoder, tokenizer = load_model("dnabert_s", demo_checkpoints / "dnabert_s")
    assert encoder.hidden_size == DEMO_DNABERT_S["hidden_size"]
    ids = tokenizer.encode(DNA[0])
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and len(ids) < len(DNA[0])
    out = load_embedder("dnabert_s", demo_checkpoints / "dnabert_s", RuntimeConfig(device="cpu")).embed(DNA)
    assert out.shape == (len(DNA), DEMO_DNABERT_S["hidden_size"]) and np.isfinite(out).all()


def test_unknown_kind():
    with pytest.raises(ValueError, match="model kind"):
        load_model("bert", "/nonexistent")
