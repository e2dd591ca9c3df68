"""Request cancellation and the per-request cap, through the real server (issue 14, deliverable 4).

A request whose client has gone (here: its gRPC deadline passed) stops being computed: the model
asks Triton between forwards and skips the packs nobody waits for (embed_cancelled_total), and
the instance is free for the next request at once.
"""
from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.server


def esm2_counter(metrics_url: str, name: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(name + r'\{[^}]*model="esm2"[^}]*\} (\S+)', text))


def sequences_input(sequences):
    import tritonclient.grpc as grpcclient
    array = np.array([[s] for s in sequences], dtype=object)
    tensor = grpcclient.InferInput("SEQUENCE", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def test_a_request_whose_deadline_passed_stops_being_computed(embed_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(embed_server.grpc_url)
    computed = esm2_counter(embed_server.metrics_url, "embed_sequences_total")
    cancelled = esm2_counter(embed_server.metrics_url, "embed_cancelled_total")
    big = ["MKTAYIAKQRQISFVKSHFSRQ" * 45] * 1024            # ~1M tokens: minutes on a CPU
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer("esm2", [sequences_input(big)], client_timeout=1.0)
    deadline = time.monotonic() + 60
    while esm2_counter(embed_server.metrics_url, "embed_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the server never noticed the cancellation"
        time.sleep(0.5)
    skipped = esm2_counter(embed_server.metrics_url, "embed_cancelled_total") - cancelled
    done = esm2_counter(embed_server.metrics_url, "embed_sequences_total") - computed
    assert skipped > 0 and done < len(big), (skipped, done)
    started = time.monotonic()
    out = client.infer("esm2", [sequences_input(["MKL"])], client_timeout=30).as_numpy("EMBEDDING")
    assert out.shape == (1, embed_server.hidden_sizes["esm2"]) and np.isfinite(out).all()
    assert time.monotonic() - started < 30


def test_a_request_over_the_token_cap_gets_a_clear_error_and_the_next_one_works(embed_server):
    """max_request_tokens (default 1,048,576): 1,024 DNA sequences of 10 kb (each within
    DNABERT-S's max_length) are millions of tokens; refused alone, naming the cap, before any forward."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(embed_server.grpc_url)
    rng = np.random.default_rng(0)
    dna = ["".join(rng.choice(list("ACGT"), 10_000)) for _ in range(8)] * 128
    with pytest.raises(InferenceServerException, match="max_request_tokens 1048576"):
        client.infer("dnabert_s", [sequences_input(dna)], client_timeout=120)
    out = client.infer("esm2", [sequences_input(["MKTAY", "MKL"])], client_timeout=30).as_numpy("EMBEDDING")
    assert out.shape == (2, embed_server.hidden_sizes["esm2"])
