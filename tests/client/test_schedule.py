"""Bucketing: blocks of consecutive frames, request cutting by token budget and batch size."""
import random

import pytest

from embed_client.schedule import Item, blocks_of, cut_requests, token_cost


def items(lengths):
    return [Item(i, f"f{i}", "A" * n) for i, n in enumerate(lengths)]


def frames(n):
    """(frame id, {model: text}) for frames f0..f{n-1}: protein "P<i>", nucleotide "N<i>"."""
    return [(f"f{i}", {"esm2": f"P{i}", "dnabert_s": f"N{i}"}) for i in range(n)]


# --- blocks_of ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, window, sizes", [
    (5, 2, [2, 2, 1]),        # the last block holds what is left
    (4, 2, [2, 2]),           # an exact multiple: no empty block at the end
    (3, 10, [3]),             # a window larger than the input: one block
    (3, 1, [1, 1, 1]),
    (0, 4, []),               # no frame, no block
])
def test_blocks_are_consecutive_windows_numbered_from_zero(n, window, sizes):
    blocks = list(blocks_of(frames(n), window, ["esm2"]))
    assert [b.size for b in blocks] == sizes
    assert [b.number for b in blocks] == list(range(len(sizes)))
    assert [b.first_index for b in blocks] == [k * window for k in range(len(sizes))]
    assert [b.frame_ids for b in blocks] == [
        [f"f{i}" for i in range(k * window, k * window + size)] for k, size in enumerate(sizes)]


def test_each_model_gets_its_own_text_with_the_frames_index_and_id():
    first, second = blocks_of(frames(3), 2, ["esm2", "dnabert_s"])
    assert first.items == {
        "esm2": [Item(0, "f0", "P0"), Item(1, "f1", "P1")],
        "dnabert_s": [Item(0, "f0", "N0"), Item(1, "f1", "N1")],
    }
    assert second.items == {"esm2": [Item(2, "f2", "P2")], "dnabert_s": [Item(2, "f2", "N2")]}


def test_only_the_listed_models_get_items():
    (block,) = blocks_of(frames(2), 8, ["dnabert_s"])
    assert block.items == {"dnabert_s": [Item(0, "f0", "N0"), Item(1, "f1", "N1")]}


def test_blocks_stream_without_reading_past_the_next_frame():
    """A block is handed out once the first frame of the next one is read (bounded memory)."""
    read = []

    def stream():
        for frame in frames(7):
            read.append(frame[0])
            yield frame
        raise AssertionError("read to the end")

    blocks = blocks_of(stream(), 3, ["esm2"])
    assert next(blocks).frame_ids == ["f0", "f1", "f2"]
    assert read == ["f0", "f1", "f2", "f3"]


# --- token_cost and cut_requests ------------------------------------------------------------


def test_token_cost_counts_specials_and_the_letters_per_token():
    assert token_cost("MKV") == 5                      # ESM-2: one token per residue + BOS/EOS
    assert token_cost("A" * 230, 4.0) == 58 + 2        # DNABERT-S: ~4 bp per BPE token, rounded up


def test_requests_respect_budget_and_batch_size_and_keep_every_item_once():
    lengths = [5, 300, 40, 41, 120, 7, 300, 2]
    requests = cut_requests("esm2", 0, items(lengths), token_budget=310, max_batch_size=3)
    sent = [item.index for r in requests for item in r.items]
    assert sorted(sent) == list(range(len(lengths)))
    assert all(len(r.items) <= 3 for r in requests)
    assert all(r.tokens <= 310 or len(r.items) == 1 for r in requests)
    assert [len(i.text) for i in requests[0].items] == [2, 5, 7]   # length-sorted


def test_requests_are_cut_greedily_in_length_order():
    # costs (letters + 2), sorted: 4 7 9 12 | 42 43 | 122 | 302 | 302
    lengths = [5, 300, 40, 41, 120, 7, 300, 2, 10]
    requests = cut_requests("esm2", 4, items(lengths), token_budget=100, max_batch_size=4)
    assert [[len(i.text) for i in r.items] for r in requests] == [
        [2, 5, 7, 10], [40, 41], [120], [300], [300]]
    assert [r.tokens for r in requests] == [32, 85, 122, 302, 302]
    assert {(r.model, r.block) for r in requests} == {("esm2", 4)}


def test_a_bpe_estimate_packs_about_four_times_more_dna_per_request():
    dna = items([230] * 100)
    as_letters = cut_requests("dnabert_s", 0, dna, token_budget=2400, max_batch_size=1024)
    as_bpe = cut_requests("dnabert_s", 0, dna, token_budget=2400, max_batch_size=1024, letters_per_token=4.0)
    assert len(as_letters) == 10 and len(as_bpe) == 3


def test_blocks_of_random_lengths_cut_into_requests_within_the_limits():
    rng = random.Random(1)
    frames = [(f"f{i}", {"esm2": "M" * rng.randint(1, 300)}) for i in range(1000)]
    blocks = list(blocks_of(frames, 128, ["esm2"]))
    assert [b.size for b in blocks] == [128] * 7 + [104]     # 1000 = 7 * 128 + 104
    assert [b.first_index for b in blocks] == [128 * k for k in range(8)]
    for block in blocks:
        requests = cut_requests("esm2", block.number, block.items["esm2"], 2000, 16)
        sent = [item for r in requests for item in r.items]
        assert sorted(i.index for i in sent) == list(range(block.first_index,
                                                           block.first_index + block.size))
        lengths = [len(i.text) for i in sent]
        assert lengths == sorted(lengths)  # length-sorted inside the window
        for r in requests:
            assert len(r.items) <= 16
            assert r.tokens == sum(len(i.text) + 2 for i in r.items)   # letters + BOS/EOS each
            assert r.tokens <= 2000 or len(r.items) == 1
