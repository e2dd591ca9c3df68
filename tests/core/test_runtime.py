"""The runtime: packed == padded == one at a time, input order, dtype, OOM split-and-retry, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from embed_core import (Embedder, InvalidSequenceError, RuntimeConfig, SequenceTooLargeError, choose_dtype,
                        load_model, token_budget_for)
from embed_core.runtime import (CPU_TOKEN_BUDGET, MAX_TOKEN_BUDGET, MIN_TOKEN_BUDGET, budget_from_memory,
                                encoder_dims)

MODELS = ("esm2", "dnabert_s")
LETTERS = {"esm2": "ACDEFGHIKLMNPQRSTVWY", "dnabert_s": "ACGT"}
LENGTHS = {"esm2": (1, 60), "dnabert_s": (4, 200)}   # letters; mixed on purpose
FP32 = RuntimeConfig(device="cpu", dtype="float32", token_budget=96)  # several packs per call


def random_sequences(kind: str, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list(LETTERS[kind]))
    lo, hi = LENGTHS[kind]
    return ["".join(rng.choice(letters, rng.integers(lo, hi + 1))) for _ in range(count)]


@pytest.fixture(scope="module", params=MODELS)
def model(request, demo_checkpoints):
    """(kind, encoder, tokenizer) from the demo checkpoints, fp32 on CPU."""
    encoder, tokenizer = load_model(request.param, demo_checkpoints / request.param)
    return request.param, encoder, tokenizer


# The published pooling rules, stated here rather than read from the encoder under test:
# ESM-2 averages residues only (BOS and EOS left out), DNABERT-S every token ([CLS], [SEP] in).
SPECIALS_LEFT_OUT = {"esm2": (1, 1), "dnabert_s": (0, 0)}   # (first, last) tokens not averaged


def padded_reference(kind: str, encoder, token_arrays) -> np.ndarray:
    """forward_padded over one zero-padded batch, then the masked mean (the reference path)."""
    lengths = torch.tensor([len(t) for t in token_arrays])
    ids = torch.zeros(len(token_arrays), int(lengths.max()), dtype=torch.long)
    for i, t in enumerate(token_arrays):
        ids[i, :len(t)] = torch.from_numpy(t)
    pos = torch.arange(ids.shape[1])[None]
    mask = pos < lengths[:, None]
    first, last = SPECIALS_LEFT_OUT[kind]
    keep = (pos >= first) & (pos < (lengths - last)[:, None])
    with torch.inference_mode():
        hidden = encoder.forward_padded(ids, mask).float()          # [B, L, H]
    pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
    return pooled.numpy()


def test_packed_equals_padded_equals_single(model):
    kind, encoder, tokenizer = model
    n = 16
    sequences = random_sequences(kind, n)
    embedder = Embedder(encoder, tokenizer, FP32)
    ids = embedder.tokenize(sequences)
    assert len({len(t) for t in ids}) > 8, "mixed lengths"
    packed = embedder.embed_tokens(ids)
    assert packed.shape == (n, encoder.hidden_size) and packed.dtype == np.float32
    assert embedder.stats.forward_passes > 1, "the token budget cuts several packs"
    padded = padded_reference(kind, encoder, ids)
    single = np.concatenate([embedder.embed([s]) for s in sequences])
    np.testing.assert_allclose(packed, padded, rtol=0, atol=1e-5)
    np.testing.assert_allclose(packed, single, rtol=0, atol=1e-5)
    # Input order is kept whatever the order of the lengths: a permuted input gives permuted rows.
    perm = np.random.default_rng(1).permutation(n)
    np.testing.assert_allclose(embedder.embed([sequences[i] for i in perm]), packed[perm], rtol=0, atol=1e-5)
    assert embedder.stats.sequences == 3 * n           # packed, one at a time, permuted
    assert embedder.stats.tokens == 3 * sum(len(t) for t in ids)


def bf16_matmul_works() -> bool:
    try:
        a = torch.randn(8, 8, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except RuntimeError:
        return False


@pytest.mark.skipif(not bf16_matmul_works(), reason="bfloat16 matmul is not supported on this CPU")
def test_bf16_close_to_fp32(model):
    kind, encoder, tokenizer = model
    sequences = random_sequences(kind, 16, seed=2)
    fp32 = Embedder(encoder, tokenizer, FP32).embed(sequences)
    bf16 = Embedder(encoder, tokenizer, RuntimeConfig(device="cpu", dtype="bfloat16")).embed(sequences)
    encoder.float()  # the fixture is shared: back to fp32 for the other tests
    assert bf16.dtype == np.float32
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() >= 0.999, cosine


def test_oom_split_and_retry(model):
    kind, encoder, tokenizer = model
    sequences = random_sequences(kind, 12, seed=3)
    reference = Embedder(encoder, tokenizer, FP32).embed(sequences)
    embedder = Embedder(encoder, tokenizer, RuntimeConfig(device="cpu", dtype="float32", token_budget=10_000))
    ids = embedder.tokenize(sequences)
    limit = max(len(t) for t in ids) + 5          # every sequence fits alone; the whole call does not
    ran = []

    def fail_above_limit(batch):                  # an allocation failure, injected before the forward
        tokens = int(batch.cu_seqlens[-1])
        if tokens > limit:
            raise torch.cuda.OutOfMemoryError(f"injected: {tokens} tokens > {limit}")
        ran.append(tokens)

    embedder.before_forward = fail_above_limit
    out = embedder.embed_tokens(ids)
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5)
    assert embedder.stats.forward_passes == len(ran) > 1 and max(ran) <= limit
    assert sum(ran) == sum(len(t) for t in ids), "nothing lost, nothing run twice"
    assert embedder.stats.oom_retries >= 1 and embedder.stats.failures == 0

    # One sequence that cannot fit even alone: it fails, naming its index; the rest are kept when asked.
    long_index = 5
    long_ids = ids[:long_index] + [np.concatenate([max(ids, key=len)] * 2)] + ids[long_index:]
    assert len(long_ids[long_index]) > limit
    with pytest.raises(SequenceTooLargeError, match=rf"sequence {long_index}: {len(long_ids[long_index])} tokens"):
        embedder.embed_tokens(long_ids)
    failures = {}
    out = embedder.embed_tokens(long_ids, failures=failures)
    assert list(failures) == [long_index] and failures[long_index].index == long_index
    assert np.isnan(out[long_index]).all()
    kept = np.delete(out, long_index, axis=0)
    np.testing.assert_allclose(kept, reference, rtol=0, atol=1e-5)
    assert embedder.stats.failures == 2


BAD = {
    "esm2": [("MKTJAY", "invalid letter 'J' at position 4"), ("", "empty")],
    "dnabert_s": [("ACGT1ACGT", "invalid letter '1' at position 5"), ("", "empty")],
}


def test_bad_input_names_index_and_problem(model):
    kind, encoder, tokenizer = model
    embedder = Embedder(encoder, tokenizer, RuntimeConfig(device="cpu", max_length=50))
    good = random_sequences(kind, 3, seed=4)
    good = [s[:50] for s in good]
    for bad, problem in BAD[kind] + [(LETTERS[kind][0] * 51, "length 51 exceeds max_length 50")]:
        with pytest.raises(InvalidSequenceError, match=rf"^sequence 2: .*{problem}") as caught:
            embedder.embed(good[:2] + [bad] + good[2:])
        assert caught.value.index == 2
    assert embedder.stats.failures == 3 and embedder.stats.sequences == 0
    # Two problems: the first index is named, whichever the kind of problem.
    bad_letter, too_long = BAD[kind][0][0], LETTERS[kind][0] * 51
    for sequences, index in (([good[0], bad_letter, too_long], 1), ([good[0], too_long, bad_letter], 1),
                             ([too_long, good[0], bad_letter], 0)):
        with pytest.raises(InvalidSequenceError) as caught:
            embedder.tokenize(sequences)
        assert caught.value.index == index


def test_truncate_policy_reports_each_sequence(model):
    kind, encoder, tokenizer = model
    embedder = Embedder(encoder, tokenizer, RuntimeConfig(device="cpu", dtype="float32", max_length=30,
                                                          too_long="truncate"))
    sequences = random_sequences(kind, 6, seed=5)
    sequences[1], sequences[4] = sequences[1] * 40, sequences[4] * 50
    sequences = [s if i in (1, 4) else s[:30] for i, s in enumerate(sequences)]
    out = embedder.embed(sequences)
    assert embedder.last_truncated == {1: (len(sequences[1]), 30), 4: (len(sequences[4]), 30)}
    np.testing.assert_allclose(out[1], embedder.embed([sequences[1][:30]])[0], rtol=0, atol=1e-5)
    assert embedder.last_truncated == {}


def test_token_budget_formula():
    h, i, heads = 2560, 10240, 40                  # ESM-2 3B
    gib = 1 << 30
    budgets = [budget_from_memory(f * gib, h, i, heads, 2) for f in (0, 2, 4, 8, 16, 32, 64, 128)]
    assert budgets == sorted(budgets), "monotone in free memory"
    assert budgets[0] == MIN_TOKEN_BUDGET and budgets[-1] == MAX_TOKEN_BUDGET, "clamped"
    assert MIN_TOKEN_BUDGET < budgets[3] < MAX_TOKEN_BUDGET
    assert all(b % 64 == 0 for b in budgets)
    # Bigger activations per token (fp32, wider model) -> fewer tokens for the same memory.
    assert budget_from_memory(8 * gib, h, i, heads, 4) < budget_from_memory(8 * gib, h, i, heads, 2)
    assert budget_from_memory(8 * gib, 768, 3072, 12, 2) > budget_from_memory(8 * gib, h, i, heads, 2)


def test_device_policy(model):
    kind, encoder, tokenizer = model
    assert choose_dtype(torch.device("cpu")) == torch.float32
    assert token_budget_for(torch.device("cpu"), encoder, torch.float32) == CPU_TOKEN_BUDGET
    assert encoder_dims(encoder)[0] == encoder.hidden_size
    embedder = Embedder(encoder, tokenizer, RuntimeConfig(device="cpu"))
    assert embedder.dtype == torch.float32 and embedder.token_budget == CPU_TOKEN_BUDGET
    assert Embedder(encoder, tokenizer, RuntimeConfig(device="cpu", token_budget=500)).token_budget == 500
    assert embedder.embed_tokens([]).shape == (0, encoder.hidden_size)
    embedder.warmup()
    assert embedder.stats.sequences == 0 and embedder.stats.forward_passes == 0
    assert not embedder.plan.compiled, "CPU stays eager"


@pytest.mark.parametrize("bad", [dict(device="gpu"), dict(device="cuda:x"), dict(dtype="fp9"),
                                 dict(token_budget=0), dict(max_length=-1), dict(too_long="drop")])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        RuntimeConfig(**bad)
