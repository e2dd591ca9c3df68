"""Layers, per-token and first-token rows through the real server (issue 15), against transformers'
EsmModel hidden states (the independent reference) for the demo ESM-2 checkpoint.

A request asks with its KServe parameters: include = mean,bos,per_token; layer = 0..n or -1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.server

PROTEINS = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWY", "M", "mkl"]


def infer(url: str, model: str, sequences, parameters=None, outputs=("EMBEDDING",)):
    import tritonclient.grpc as grpcclient
    array = np.array([[s] for s in sequences], dtype=object)
    tensor = grpcclient.InferInput("SEQUENCE", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    client = grpcclient.InferenceServerClient(url)
    result = client.infer(model, [tensor], parameters=parameters,
                          outputs=[grpcclient.InferRequestedOutput(name) for name in outputs])
    return {name: result.as_numpy(name) for name in outputs}


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_esm2_layers_per_token_and_bos_equal_transformers(embed_server, layer):
    transformers = pytest.importorskip("transformers", reason="transformers is the independent ESM-2 reference")
    reference = transformers.EsmModel.from_pretrained(embed_server.checkpoints / "esm2",
                                                      attn_implementation="eager").eval()
    tokenizer = transformers.EsmTokenizer.from_pretrained(embed_server.checkpoints / "esm2")
    out = infer(embed_server.grpc_url, "esm2", PROTEINS, {"include": "mean,per_token,bos", "layer": layer},
                ("EMBEDDING", "BOS", "TOKEN_EMBEDDINGS", "TOKEN_COUNT"))
    assert out["TOKEN_EMBEDDINGS"].shape[:2] == (len(PROTEINS), max(len(p) for p in PROTEINS))
    for i, protein in enumerate(PROTEINS):
        ids = tokenizer(protein.upper(), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = reference(ids, output_hidden_states=True).hidden_states[layer][0].numpy()   # [L + 2, H]
        count = int(out["TOKEN_COUNT"][i, 0])
        assert count == len(protein)
        close = dict(rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["TOKEN_EMBEDDINGS"][i, :count], states[1:-1], **close)
        assert not out["TOKEN_EMBEDDINGS"][i, count:].any()                # padding is zero
        np.testing.assert_allclose(out["BOS"][i], states[0], **close)
        np.testing.assert_allclose(out["EMBEDDING"][i], states[1:-1].mean(0), **close)


def test_a_bad_parameter_fails_only_its_request_and_the_default_is_the_mean(embed_server):
    from tritonclient.utils import InferenceServerException

    plain = infer(embed_server.grpc_url, "dnabert_s", ["ACGTACGT", "GGN"])["EMBEDDING"]
    asked = infer(embed_server.grpc_url, "dnabert_s", ["ACGTACGT", "GGN"], {"include": "mean"})["EMBEDDING"]
    np.testing.assert_array_equal(plain, asked)
    with pytest.raises(InferenceServerException, match="parameter layer"):
        infer(embed_server.grpc_url, "dnabert_s", ["ACGT"], {"layer": 99})
    with pytest.raises(InferenceServerException, match="parameter include"):
        infer(embed_server.grpc_url, "esm2", ["MKL"], {"include": "logits"})
