"""DNABERT-S: parity with a naive float64 reference, published names and shapes, tokenizer ids, loaders."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from embed_core.dnabert_s import DnabertS, DnabertSConfig, alibi_slopes
from embed_core.dnabert_s_checkpoint import load_dnabert_s, published_state_dict, random_dnabert_s, write_hf_checkpoint
from embed_core.dnabert_s_tokenizer import (IUPAC_LETTERS, DnabertTokenizer, check_dna_batch, random_dna,
                                            train_demo_tokenizer)
from embed_core.errors import CheckpointError, InvalidSequenceError
from embed_core.packing import mean_pool_packed, pack
from references import dnabert_reference_hidden, paper_slopes

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
PUBLISHED = FIXTURES / "dnabert2-117m"
README_DNA = "ACGTAGCATCGGATCTATCTATCGACACTTGGTTATCGATCTACGAGCATCTCGTTAGC"
README_IDS = [1, 5, 194, 32, 757, 1239, 2092, 294, 24, 359, 88, 93, 32, 75, 77, 19, 2]

SMALL = DnabertSConfig(vocab_size=512, hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                       intermediate_size=128)
LENGTHS_BP = [1, 9, 240, 37, 5, 400, 64]  # mixed, unsorted: checks that order is kept


def published_fixture(name: str) -> Path:
    path = PUBLISHED / name
    if not path.is_file():
        pytest.skip(f"fixture {path} is absent")
    return path


@pytest.fixture(scope="module")
def demo_tokenizer_path(tmp_path_factory) -> Path:
    return train_demo_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=SMALL.vocab_size)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_tokenizer_path) -> DnabertTokenizer:
    return DnabertTokenizer.from_file(demo_tokenizer_path)


@pytest.fixture(scope="module")
def small_model() -> DnabertS:
    return random_dnabert_s(SMALL, seed=1)


@pytest.fixture(scope="module")
def token_ids(demo_tokenizer) -> list[np.ndarray]:
    seqs = [random_dna(1, n, seed=100 + i)[0] for i, n in enumerate(LENGTHS_BP)]
    return [demo_tokenizer.encode(s) for s in seqs]


# --------------------------------------------------------------------------- independent reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("n", [1, 2, 4, 6, 8, 12, 16, 20, 32])
def test_alibi_slopes_follow_the_paper_rule(n):
    assert alibi_slopes(n) == pytest.approx(paper_slopes(n), rel=1e-12)


def test_alibi_slopes_12_heads_published_values():
    expected = [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8,
                2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    assert alibi_slopes(12) == pytest.approx(expected, rel=1e-12)
    assert alibi_slopes(12)[8:] == pytest.approx([0.70711, 0.35355, 0.17678, 0.08839], abs=1e-5)


def test_full_size_state_dict_has_published_names_and_shapes():
    with torch.device("meta"):
        model = DnabertS(DnabertSConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "embeddings.word_embeddings.weight": (4096, 768),
        "embeddings.token_type_embeddings.weight": (2, 768),
        "embeddings.LayerNorm.weight": (768,), "embeddings.LayerNorm.bias": (768,),
        "pooler.dense.weight": (768, 768), "pooler.dense.bias": (768,),
    }
    for n in range(12):
        p = f"encoder.layer.{n}."
        expected.update({
            p + "attention.self.Wqkv.weight": (2304, 768), p + "attention.self.Wqkv.bias": (2304,),
            p + "attention.output.dense.weight": (768, 768), p + "attention.output.dense.bias": (768,),
            p + "attention.output.LayerNorm.weight": (768,), p + "attention.output.LayerNorm.bias": (768,),
            p + "mlp.gated_layers.weight": (6144, 768),
            p + "mlp.wo.weight": (768, 3072), p + "mlp.wo.bias": (768,),
            p + "mlp.layernorm.weight": (768,), p + "mlp.layernorm.bias": (768,),
        })
    assert shapes == expected
    assert len(shapes) == 138
    assert sum(math.prod(s) for s in shapes.values()) == 117_068_544
    assert (model.hidden_size, model.pool_skip_first, model.pool_skip_last) == (768, 0, 0)


def test_config_from_published_json():
    data = json.loads(published_fixture("config.json").read_text())
    assert DnabertSConfig.from_json(data) == DnabertSConfig()
    assert set(data) <= set(DnabertSConfig().to_json("dnabert_s"))


def test_config_validation():
    base = SMALL.to_json()
    assert DnabertSConfig.from_json({**base, "unrelated": [1, 2]}) == SMALL
    with pytest.raises(ValueError, match="hidden_size"):
        DnabertSConfig.from_json({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="divisible"):
        DnabertSConfig.from_json({**base, "num_attention_heads": 7})
    with pytest.raises(ValueError, match="layer_norm_eps"):
        DnabertSConfig.from_json({**base, "layer_norm_eps": 0})


# --------------------------------------------------------------------------- numerics


def test_matches_naive_float64_reference(small_model, token_ids):
    batch = pack(token_ids)
    with torch.no_grad():
        hidden = small_model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
    pooled = mean_pool_packed(hidden, batch.cu_seqlens, small_model.pool_skip_first, small_model.pool_skip_last)
    state = small_model.state_dict()
    for i, ids in enumerate(token_ids):
        ref = dnabert_reference_hidden(state, SMALL, ids.tolist())
        assert rel_err(pooled[i], ref.mean(0)) < 1e-5, f"sequence {i} ({len(ids)} tokens)"
        start, end = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        assert rel_err(hidden[start:end], ref) < 1e-5, f"sequence {i} per-token"


def test_packed_padded_and_single_agree(small_model, token_ids):
    batch = pack(token_ids)
    longest = batch.max_seqlen
    with torch.no_grad():
        packed = small_model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
        singles = [small_model.forward_packed(torch.from_numpy(ids), torch.tensor([0, len(ids)], dtype=torch.int32),
                                              len(ids)) for ids in token_ids]
        for left in (False, True):  # ALiBi is translation-invariant: left padding gives the same states
            ids_pad = torch.full((len(token_ids), longest), 3, dtype=torch.int64)
            mask = torch.zeros(len(token_ids), longest, dtype=torch.bool)
            for i, ids in enumerate(token_ids):
                where = slice(longest - len(ids), longest) if left else slice(0, len(ids))
                ids_pad[i, where] = torch.from_numpy(ids)
                mask[i, where] = True
            padded = small_model.forward_padded(ids_pad, mask)
            assert torch.equal(padded[~mask], torch.zeros_like(padded[~mask]))  # pads are exact zeros
            for i, single in enumerate(singles):
                start, end = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
                assert rel_err(packed[start:end], single) < 1e-5
                assert rel_err(padded[i][mask[i]], single) < 1e-5
    # order kept: every sequence differs from its neighbours
    pooled = mean_pool_packed(packed, batch.cu_seqlens)
    assert torch.cdist(pooled, pooled).fill_diagonal_(1.0).min() > 1e-3


def test_random_model_is_deterministic():
    a, b = random_dnabert_s(SMALL, seed=3), random_dnabert_s(SMALL, seed=3)
    c = random_dnabert_s(SMALL, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.layer.0.mlp.wo.weight"], sc["encoder.layer.0.mlp.wo.weight"])


# --------------------------------------------------------------------------- tokenizer


def test_published_tokenizer_readme_vector():
    tok = DnabertTokenizer.from_file(published_fixture("tokenizer.json"))
    ids = tok.encode(README_DNA)
    assert ids.dtype == np.int64 and ids.tolist() == README_IDS
    assert tok.encode(README_DNA.lower()).tolist() == README_IDS
    assert tok.encode(README_DNA[:20].lower() + README_DNA[20:]).tolist() == README_IDS
    assert [a.tolist() for a in tok.encode_batch([README_DNA, README_DNA.lower()])] == [README_IDS] * 2
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)


def test_published_tokenizer_ambiguity_codes_become_unk():
    tok = DnabertTokenizer.from_file(published_fixture("tokenizer.json"))
    assert tok.encode("NNNN").tolist() == [1, 0, 0, 0, 0, 2]
    assert tok.encode("n").tolist() == [1, 0, 2]
    ids = tok.encode("ACGTNACGTACGT").tolist()
    assert ids.count(0) == 1 and ids[0] == 1 and ids[-1] == 2
    non_acgt = IUPAC_LETTERS.replace("A", "").replace("C", "").replace("G", "").replace("T", "")
    assert tok.encode(non_acgt).tolist() == [1] + [0] * len(non_acgt) + [2]


@pytest.mark.parametrize("sequence, letter, position", [
    ("ACGT-ACGT", "-", 5), ("AC GT", " ", 3), ("ACG1", "1", 4), ("ACGT*", "*", 5),
    ("acgtz", "z", 5), ("XACGT", "X", 1), ("ACGT\n", "\n", 5), ("ACGé", "é", 4), ("AC.GT-", ".", 3),
])
def test_invalid_letters_are_named_with_position(demo_tokenizer, sequence, letter, position):
    with pytest.raises(InvalidSequenceError) as info:
        demo_tokenizer.encode(sequence)
    assert repr(letter) in str(info.value) and f"position {position}" in str(info.value)
    assert info.value.index is None


def test_empty_and_batch_errors(demo_tokenizer):
    with pytest.raises(InvalidSequenceError, match="empty"):
        demo_tokenizer.encode("")
    with pytest.raises(InvalidSequenceError) as info:
        demo_tokenizer.encode_batch(["ACGT", "ACGT", "AC!"])
    assert info.value.index == 2 and "'!'" in str(info.value)
    seqs = random_dna(5, 50, seed=9)
    assert [a.tolist() for a in demo_tokenizer.encode_batch(seqs)] == [demo_tokenizer.encode(s).tolist() for s in seqs]


@pytest.mark.parametrize("bad, index, problem", [
    (["ACGT", "", "ACGT"], 1, "empty sequence"),
    (["ACGT", "acgtn", "ACGTé"], 2, "invalid letter 'é' at position 5"),
    (["ACGT", "ACXT"], 1, "invalid letter 'X' at position 3"),
    (["ACGT", 7], 1, "expected a DNA string"),
])
def test_batch_check_names_the_first_bad_sequence(bad, index, problem):
    """The one-pass batch check (a server request) reports what the per-sequence check does."""
    with pytest.raises(InvalidSequenceError, match=re.escape(problem)) as err:
        check_dna_batch(bad)
    assert err.value.index == index
    assert check_dna_batch(["acgtn", "RYKM"]) == ["ACGTN", "RYKM"]


def test_demo_tokenizer_has_published_structure(tmp_path, demo_tokenizer_path):
    again = train_demo_tokenizer(tmp_path / "tokenizer.json", vocab_size=SMALL.vocab_size)
    assert again.read_bytes() == demo_tokenizer_path.read_bytes()  # deterministic
    mine = json.loads(demo_tokenizer_path.read_text())
    vocab = mine["model"]["vocab"]
    assert len(vocab) == SMALL.vocab_size
    assert [vocab[t] for t in ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "A", "C", "G", "T"]] == list(range(9))
    assert mine["model"]["type"] == "BPE" and mine["model"]["unk_token"] == "[UNK]"
    assert mine["normalizer"] is None and mine["pre_tokenizer"] == {"type": "Whitespace"}
    published = json.loads(published_fixture("tokenizer.json").read_text())
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation", "padding"):
        assert mine[key] == published[key], key
    for key in ("type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk"):
        assert mine["model"][key] == published["model"][key], key


# --------------------------------------------------------------------------- loader


@pytest.mark.parametrize("layout, safetensors", [("dnabert_s", False), ("dnabert_s", True),
                                                 ("dnabert2", False), ("dnabert2", True)])
def test_loader_reads_published_layouts(tmp_path, small_model, demo_tokenizer_path, token_ids, layout, safetensors):
    folder = write_hf_checkpoint(small_model, demo_tokenizer_path, tmp_path / layout, layout, safetensors)
    weights = folder / ("model.safetensors" if safetensors else "pytorch_model.bin")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", weights.name])
    if layout == "dnabert2":
        if safetensors:
            from safetensors.torch import load_file
            keys = set(load_file(str(weights)))
        else:
            keys = set(torch.load(weights, weights_only=True))
        assert "bert.embeddings.word_embeddings.weight" in keys and "cls.predictions.decoder.weight" in keys
        assert not any(k.startswith(("pooler.", "bert.pooler.")) for k in keys)
    model, tok = load_dnabert_s(folder)
    assert (model.pooler is None) == (layout == "dnabert2") and not model.training
    assert model.config == SMALL
    assert tok.encode(README_DNA).tolist() == DnabertTokenizer.from_file(demo_tokenizer_path).encode(README_DNA).tolist()
    batch = pack(token_ids)
    with torch.no_grad():
        got = model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
        want = small_model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
    assert torch.equal(got, want)
    if PUBLISHED.joinpath("config.json").is_file():
        published_keys = set(json.loads(PUBLISHED.joinpath("config.json").read_text()))
        assert published_keys <= set(json.loads((folder / "config.json").read_text()))


def test_loader_names_every_bad_tensor(tmp_path, small_model, demo_tokenizer_path):
    folder = write_hf_checkpoint(small_model, demo_tokenizer_path, tmp_path / "ckpt")
    state = published_state_dict(small_model)
    del state["encoder.layer.1.mlp.wo.bias"]
    state["encoder.layer.2.mlp.wo.bias"] = torch.zeros(SMALL.hidden_size)
    state["embeddings.word_embeddings.weight"] = torch.zeros(SMALL.vocab_size + 1, SMALL.hidden_size)
    del state["pooler.dense.bias"]  # half a pooler is an error, not an absent pooler
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_dnabert_s(folder)
    message = str(info.value)
    for name in ("encoder.layer.1.mlp.wo.bias", "encoder.layer.2.mlp.wo.bias", "pooler.dense.bias",
                 f"wrong shape: embeddings.word_embeddings.weight: checkpoint [{SMALL.vocab_size + 1}, {SMALL.hidden_size}], "
                 f"model [{SMALL.vocab_size}, {SMALL.hidden_size}]"):
        assert name in message
    assert "pytorch_model.bin" in message


def test_loader_rejects_incomplete_folders(tmp_path, small_model, demo_tokenizer_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_dnabert_s(tmp_path / "nowhere")
    folder = write_hf_checkpoint(small_model, demo_tokenizer_path, tmp_path / "ckpt")
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_dnabert_s(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_dnabert_s(folder)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 96}))
    with pytest.raises(CheckpointError, match="config.json"):
        load_dnabert_s(folder)


@pytest.mark.parametrize("layer", [1, -1])
def test_layers_and_per_token_match_the_float64_reference(small_model, token_ids, layer):
    """Embedder rows at a representation layer: per-token (every token, [CLS] and [SEP] in), the
    first token and the mean, against the naive float64 reference run for that many layers."""
    from dataclasses import replace

    from embed_core import Embedder, RuntimeConfig
    embedder = Embedder(small_model, None, RuntimeConfig(device="cpu", dtype="float32", token_budget=300))
    out = embedder.launch_tokens(token_ids, layer=layer, include=("per_token", "bos", "mean"))
    rows, offsets = out.outputs(), out.token_offsets
    layers = SMALL.num_hidden_layers if layer == -1 else layer
    state = {k: v.detach().double() for k, v in small_model.state_dict().items()}  # once, not per sequence
    config = replace(SMALL, num_hidden_layers=layers)
    for i, ids in enumerate(token_ids):
        ref = dnabert_reference_hidden(state, config, ids.tolist())
        assert rel_err(torch.from_numpy(rows["per_token"][offsets[i]:offsets[i + 1]]), ref) < 1e-5
        assert rel_err(torch.from_numpy(rows["bos"][i]), ref[0]) < 1e-5
        assert rel_err(torch.from_numpy(rows["mean"][i]), ref.mean(0)) < 1e-5
    small_model.prepare(small_model.plan)
