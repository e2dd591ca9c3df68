"""ESM-2 core: parity with transformers' EsmModel and fair-esm's ESM2, packing, loaders, tokenizer.

Small random models (3 layers, hidden 80, 4 heads of 20: a head size whose q scale is not a
power of two), fp32 on CPU. The references are the real packages on the same weights.
"""
import argparse
import fractions
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from embed_core.errors import CheckpointError, InvalidSequenceError
from embed_core.esm2 import ESM2, Esm2Config
from embed_core.esm2_checkpoint import load_esm2, random_esm2, write_fair_esm_checkpoint, write_hf_checkpoint
from embed_core.esm2_tokenizer import Esm2Tokenizer
from embed_core.packing import mean_pool_packed, pack

LAYERS, HIDDEN, HEADS, FFN = 3, 80, 4, 320
CONFIG = Esm2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN)
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "ACDEFGHIKLMNPQRSTVWYXU", "mstnpkpqrk", "M", "BZOXLAGV"]
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-row relative error ||a - b|| / ||b||."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def _ids(tokenizer=None):
    """Token arrays of SEQUENCES plus one sequence holding two <mask> tokens (token-dropout rescale)."""
    tokenizer = tokenizer or Esm2Tokenizer()
    ids = [tokenizer.encode(s) for s in SEQUENCES]
    masked = tokenizer.encode("MKTAYIAKQRQISFV")
    masked[[3, 7]] = Esm2Tokenizer.mask_id
    return ids + [masked]


def _padded(ids):
    """[B, L] pad-filled token matrix and [B, L] bool mask (right padding)."""
    length = max(len(t) for t in ids)
    tokens = torch.full((len(ids), length), Esm2Tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.bool)
    for i, t in enumerate(ids):
        tokens[i, :len(t)] = torch.from_numpy(t)
        mask[i, :len(t)] = True
    return tokens, mask


def _ours(model: ESM2, ids):
    """(per-token hidden [T, H], residue means [B, H]) from forward_packed."""
    batch = pack(ids)
    with torch.no_grad():
        hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
    return hidden, mean_pool_packed(hidden, batch.cu_seqlens, model.pool_skip_first, model.pool_skip_last)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Reference-side random weights: non-trivial LayerNorms and biases, sharp enough attention."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name.lower():
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)


@pytest.fixture(scope="module")
def model() -> ESM2:
    return random_esm2(CONFIG, seed=1)


# ----------------------------------------------------------------------------- references


def test_matches_transformers_checkpoint_saved_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the independent ESM-2 reference")
    hf_config = transformers.EsmConfig(
        vocab_size=33, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, layer_norm_eps=1e-5, token_dropout=True, mask_token_id=32, pad_token_id=1,
        position_embedding_type="rotary", emb_layer_norm_before=False, attn_implementation="eager")
    torch.manual_seed(0)
    reference = transformers.EsmForMaskedLM(hf_config).eval()
    _randomize(reference, seed=2)
    reference.save_pretrained(tmp_path)
    assert reference.config._attn_implementation == "eager"

    encoder, tokenizer = load_esm2(tmp_path)
    ids = _ids(tokenizer)
    tokens, mask = _padded(ids)
    with torch.no_grad():
        expected = reference.esm(tokens, attention_mask=mask.long()).last_hidden_state  # [B, L, H]
    hidden, pooled = _ours(encoder, ids)
    assert _rel(hidden, expected[mask]) < TOL
    residues = mask.clone()
    residues[:, 0] = False
    residues[torch.arange(len(ids)), mask.sum(1) - 1] = False
    expected_pooled = (expected * residues[..., None]).sum(1) / residues.sum(1, keepdim=True)
    assert _rel(pooled, expected_pooled) < TOL

    # The tolerance is meaningful: positions (rotary) move the embedding far more than TOL.
    reversed_ids = [np.concatenate(([t[0]], t[1:-1][::-1], [t[-1]])) for t in ids[:1]]
    with torch.no_grad():
        flipped = reference.esm(torch.from_numpy(reversed_ids[0])[None]).last_hidden_state[0, 1:-1].mean(0)
    assert _rel(flipped[None], expected_pooled[:1]) > 1e3 * TOL


def test_matches_fair_esm_checkpoint(tmp_path):
    esm = pytest.importorskip("esm", reason="fair-esm is the original ESM-2 implementation")
    from esm.model.esm2 import ESM2 as FairESM2
    reference = FairESM2(num_layers=LAYERS, embed_dim=HIDDEN, attention_heads=HEADS, alphabet="ESM-1b",
                         token_dropout=True).eval()
    _randomize(reference, seed=3)
    # The published layout: encoder under encoder.sentence_encoder., LM head under encoder.lm_head.,
    # contact regression in a separate file, cfg["model"] a Namespace of fairseq names.
    state = {("encoder." if k.startswith("lm_head.") else "encoder.sentence_encoder.") + k: v
             for k, v in reference.state_dict().items() if not k.startswith("contact_head.")}
    cfg = argparse.Namespace(encoder_layers=LAYERS, encoder_embed_dim=HIDDEN, encoder_attention_heads=HEADS,
                             token_dropout=True)
    torch.save({"model": state, "cfg": {"model": cfg}}, tmp_path / "esm2_t3_test.pt")

    encoder, tokenizer = load_esm2(tmp_path / "esm2_t3_test.pt")
    assert encoder.config == CONFIG
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    ids = _ids(tokenizer)
    tokens, mask = _padded(ids)
    with torch.no_grad():
        expected = reference(tokens, repr_layers=[LAYERS])["representations"][LAYERS]
    hidden, pooled = _ours(encoder, ids)
    assert _rel(hidden, expected[mask]) < TOL
    lengths = mask.sum(1)
    expected_pooled = torch.stack([expected[i, 1:n - 1].mean(0) for i, n in enumerate(lengths.tolist())])
    assert _rel(pooled, expected_pooled) < TOL
    assert alphabet.padding_idx == Esm2Tokenizer.pad_id and alphabet.mask_idx == Esm2Tokenizer.mask_id


def test_hf_writer_is_read_by_transformers(model, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the independent ESM-2 reference")
    write_hf_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["EsmForMaskedLM"] and config["model_type"] == "esm"
    reference, info = transformers.EsmForMaskedLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                  attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf_tokenizer = transformers.EsmTokenizer.from_pretrained(tmp_path)
    tokenizer = Esm2Tokenizer()
    for sequence in SEQUENCES:
        assert hf_tokenizer(sequence.upper())["input_ids"] == tokenizer.encode(sequence).tolist()
    ids = _ids(tokenizer)
    tokens, mask = _padded(ids)
    with torch.no_grad():
        expected = reference.eval().esm(tokens, attention_mask=mask.long()).last_hidden_state
    assert _rel(_ours(model, ids)[0], expected[mask]) < TOL


def test_fair_esm_writer_is_read_by_fair_esm(model, tmp_path):
    esm = pytest.importorskip("esm", reason="fair-esm is the original ESM-2 implementation")
    path = write_fair_esm_checkpoint(model, tmp_path / "esm2_demo.pt")
    data = torch.load(path, map_location="cpu", weights_only=False)
    # fair-esm's own strict loader (only the separate contact-regression weights may be absent).
    with pytest.warns(UserWarning, match="Regression weights not found"):
        reference, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2_demo", data)
    ids = _ids()
    tokens, mask = _padded(ids)
    with torch.no_grad():
        expected = reference.eval()(tokens, repr_layers=[LAYERS])["representations"][LAYERS]
    assert _rel(_ours(model, ids)[0], expected[mask]) < TOL


# ----------------------------------------------------------------------------- packing


def test_packed_equals_padded_equals_one_at_a_time(model):
    ids = _ids()
    hidden, pooled = _ours(model, ids)
    tokens, mask = _padded(ids)
    with torch.no_grad():
        padded = model.forward_padded(tokens, mask)
    assert _rel(hidden, padded[mask]) < TOL
    singles = torch.cat([_ours(model, [t])[1] for t in ids])
    assert _rel(pooled, singles) < TOL
    assert torch.cdist(pooled, pooled).fill_diagonal_(1.0).min() > 1e-2  # distinct rows: order is tested


def test_bfloat16_keeps_rotary_in_float32(model):
    ids = _ids()
    reference = _ours(model, ids)[1]
    low = random_esm2(CONFIG, seed=1).to(torch.bfloat16)
    assert low.rotary_embeddings.inv_freq.dtype == torch.float32
    assert torch.equal(low.rotary_embeddings.inv_freq, model.rotary_embeddings.inv_freq)
    hidden, pooled = _ours(low, ids)
    assert hidden.dtype == torch.bfloat16
    assert _rel(pooled, reference) < 3e-2


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("layout", ["hf-safetensors", "hf-bin", "fair-esm"])
def test_loader_round_trip(model, tmp_path, layout):
    if layout == "fair-esm":
        path = write_fair_esm_checkpoint(model, tmp_path / "m.pt")
    else:
        path = write_hf_checkpoint(model, tmp_path, safetensors=layout == "hf-safetensors")
    loaded, _ = load_esm2(path)
    assert loaded.config == model.config and not loaded.training
    loaded_state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert loaded_state[name].dtype == torch.float32 and torch.equal(loaded_state[name], tensor), name


def _break(state, missing, extra, reshaped):
    del state[missing]
    state[extra] = torch.zeros(3)
    state[reshaped] = torch.zeros(10, HIDDEN)


@pytest.mark.parametrize("layout", ["hf-safetensors", "hf-bin", "fair-esm"])
def test_loader_names_every_bad_tensor(model, tmp_path, layout):
    if layout == "fair-esm":
        path = write_fair_esm_checkpoint(model, tmp_path / "m.pt")
        data = torch.load(path, weights_only=False)
        p = "encoder.sentence_encoder.layers"
        names = (f"{p}.1.fc2.bias", f"{p}.0.self_attn.extra.weight", f"{p}.0.fc1.weight")
        _break(data["model"], *names)
        torch.save(data, path)
    else:
        path = write_hf_checkpoint(model, tmp_path, safetensors=layout == "hf-safetensors")
        p = "esm.encoder.layer"
        names = (f"{p}.1.output.dense.bias", f"{p}.0.attention.self.extra.weight", f"{p}.0.intermediate.dense.weight")
        file = path / ("model.safetensors" if layout == "hf-safetensors" else "pytorch_model.bin")
        state = load_file(file) if layout == "hf-safetensors" else torch.load(file)
        _break(state, *names)
        save_file(state, file) if layout == "hf-safetensors" else torch.save(state, file)
    with pytest.raises(CheckpointError) as error:
        load_esm2(path)
    message = str(error.value)
    assert f"missing: {names[0]}" in message
    assert f"unexpected: {names[1]}" in message
    assert f"wrong shape: {names[2]}: checkpoint [10, {HIDDEN}], model [{FFN}, {HIDDEN}]" in message


def test_loader_reads_sharded_hf_checkpoint(model, tmp_path):
    write_hf_checkpoint(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
    (tmp_path / "model.safetensors").unlink()
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded, _ = load_esm2(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_loader_refuses_arbitrary_pickles_unless_allowed(model, tmp_path):
    path = write_fair_esm_checkpoint(model, tmp_path / "m.pt")
    data = torch.load(path, weights_only=False)
    data["cfg"]["optimizer"] = fractions.Fraction(1, 3)  # any class torch's weights-only unpickler refuses
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_esm2(path)
    loaded, _ = load_esm2(path, allow_pickle=True)
    assert loaded.config == model.config


def test_loader_rejects_unsupported_config(model, tmp_path):
    write_hf_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["position_embedding_type"]  # transformers' default: absolute (ESM-1b)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*position_embedding_type='absolute'"):
        load_esm2(tmp_path)


def test_loader_rejects_fair_esm_v1_checkpoint(tmp_path):
    torch.save({"model": {}, "args": argparse.Namespace(arch="roberta_large")}, tmp_path / "esm1b.pt")
    with pytest.raises(CheckpointError, match="roberta_large.*only ESM-2"):
        load_esm2(tmp_path / "esm1b.pt")


# ----------------------------------------------------------------------------- config


def test_config_json_round_trip_and_validation():
    assert Esm2Config.from_hf_json(CONFIG.to_hf_json()) == CONFIG
    assert Esm2Config.from_fair_esm({"num_layers": 3, "embed_dim": 80, "attention_heads": 4}) == CONFIG
    with pytest.raises(ValueError, match="absolute"):
        Esm2Config(position_embedding_type="absolute")
    with pytest.raises(ValueError, match="emb_layer_norm_before"):
        Esm2Config.from_hf_json({**CONFIG.to_hf_json(), "emb_layer_norm_before": True})
    with pytest.raises(ValueError, match="not a multiple"):
        Esm2Config(hidden_size=80, num_attention_heads=3)
    with pytest.raises(ValueError, match="encoder_attention_heads"):
        Esm2Config.from_fair_esm(argparse.Namespace(encoder_layers=3, encoder_embed_dim=80))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_fair_esm_alphabet():
    esm = pytest.importorskip("esm", reason="fair-esm defines the ESM-2 alphabet")
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    assert tuple(alphabet.all_toks) == Esm2Tokenizer.TOKENS
    assert "J" not in alphabet.tok_to_idx
    converter = alphabet.get_batch_converter()
    tokenizer = Esm2Tokenizer()
    for sequence in SEQUENCES + [Esm2Tokenizer.RESIDUES]:
        _, _, tokens = converter([("x", sequence.upper())])
        assert tokenizer.encode(sequence).tolist() == tokens[0].tolist()
        assert tokenizer.encode(sequence).dtype == np.int64


@pytest.mark.parametrize("sequence, letter, position", [
    ("MKJL", "J", 3), ("MKT*", "*", 4), ("1MK", "1", 1), ("MK L", " ", 3), ("MKé", "é", 3),
    ("MK.", ".", 3), ("MK-", "-", 3), ("A" * 5000 + "<mask>", "<", 5001),
])
def test_tokenizer_rejects_bad_letters(sequence, letter, position):
    with pytest.raises(InvalidSequenceError) as error:
        Esm2Tokenizer().encode(sequence)
    assert f"{letter!r} at position {position}" in str(error.value)
    assert error.value.index is None


def test_tokenizer_rejects_empty():
    with pytest.raises(InvalidSequenceError, match="empty"):
        Esm2Tokenizer().encode("")


# ----------------------------------------------------------------------------- what to return


@pytest.mark.parametrize("layer", [0, 1, LAYERS - 1, -1])
def test_layers_per_token_and_bos_match_transformers_hidden_states(tmp_path, layer):
    """fair-esm's --repr_layers / --include mean per_tok bos through the Embedder, against
    transformers' EsmModel hidden_states (0 = embeddings, k = after k layers, the last with the
    final LayerNorm), one sequence at a time, fp32: per-token rows = the residues, their mean = mean."""
    transformers = pytest.importorskip("transformers", reason="transformers is the independent ESM-2 reference")
    from embed_core import Embedder, RuntimeConfig

    write_hf_checkpoint(random_esm2(CONFIG, seed=3), tmp_path)
    reference = transformers.EsmModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    encoder, tokenizer = load_esm2(tmp_path)
    embedder = Embedder(encoder, tokenizer, RuntimeConfig(device="cpu", dtype="float32", token_budget=64))
    ids = _ids(tokenizer)
    out = embedder.launch_tokens(ids, layer=layer, include=("mean", "per_token", "bos"))
    rows, offsets = out.outputs(), out.token_offsets
    for i, t in enumerate(ids):
        with torch.no_grad():
            states = reference(torch.from_numpy(t)[None], output_hidden_states=True).hidden_states
        expected = states[layer][0]                                  # [L, H] with BOS and EOS
        tokens = torch.from_numpy(rows["per_token"][offsets[i]:offsets[i + 1]])
        assert tokens.shape == (len(t) - 2, HIDDEN)
        close = dict(rtol=1e-4, atol=1e-6)       # absolute too: <mask> rows are zero at layer 0
        torch.testing.assert_close(tokens, expected[1:-1], **close)
        torch.testing.assert_close(torch.from_numpy(rows["bos"][i]), expected[0], **close)
        torch.testing.assert_close(torch.from_numpy(rows["mean"][i]), expected[1:-1].mean(0), **close)
    with pytest.raises(ValueError, match="outside this model's 0..3"):
        embedder.launch_tokens(ids, layer=LAYERS + 1)
