"""Request cutting: token budget, max batch size, per-model token estimates, length order."""
from embed_client.schedule import Item, cut_requests, token_cost


def items(lengths):
    return [Item(i, f"f{i}", "A" * n) for i, n in enumerate(lengths)]


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


def test_a_bpe_estimate_packs_about_four_times_more_dna_per_request():
    dna = items([230] * 100)
    as_letters = cut_requests("dnabert_s", 0, dna, token_budget=2400, max_batch_size=1024)
    as_bpe = cut_requests("dnabert_s", 0, dna, token_budget=2400, max_batch_size=1024, letters_per_token=4.0)
    assert len(as_letters) == 10 and len(as_bpe) == 3
