"""embed-export onnx: the exported graph (onnxruntime, CPU) equals the PyTorch model core."""
from __future__ import annotations

import random

import numpy as np
import pytest

from embed_export.cli import main

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (extra 'export')")
pytest.importorskip("onnxruntime", reason="ONNX verification needs onnxruntime (extra 'export')")

from embed_export.onnx_export import onnx_session, pad_batch, run_onnx  # noqa: E402

TOLERANCE = 1e-4
# Lengths unlike the exporter's own verification set, one batch padded to the longest.
LENGTHS = {"esm2": (1, 3, 40, 64, 101, 170, 255), "dnabert_s": (1, 9, 120, 271, 500, 731)}
SOURCES = {"esm2": "esm2", "esm2-fair": "esm2_fair.pt", "dnabert_s": "dnabert_s"}


def sequences(model: str, seed: int = 7) -> list:
    rng = random.Random(seed)
    letters = "ACDEFGHIKLMNPQRSTVWYX" if model == "esm2" else "ACGTN"
    return ["".join(rng.choice(letters) for _ in range(n)) for n in LENGTHS[model]]


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_onnx_matches_model_core(demo_checkpoints, tmp_path, capsys, source):
    from embed_core import RuntimeConfig, load_embedder

    model = "esm2" if source.startswith("esm2") else "dnabert_s"
    checkpoint = demo_checkpoints / SOURCES[source]
    out = tmp_path / "onnx"
    extra = ["--external-data", "always"] if source == "dnabert_s" else []  # the >2 GB layout, small
    assert main(["onnx", "--model", model, "--checkpoint", str(checkpoint), "--out", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert "verified with onnxruntime" in printed and "max |onnx - model core|" in printed

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert (out / "model.onnx.data").is_file() == bool(extra)
    session = onnx_session(out / "model.onnx")
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert all(i.type == "tensor(int64)" and len(i.shape) == 2 and all(isinstance(d, str) for d in i.shape)
               for i in inputs.values())  # dynamic batch and length
    [output] = session.get_outputs()
    assert output.name == "embedding" and output.type == "tensor(float)"

    embedder = load_embedder(model, checkpoint, RuntimeConfig(device="cpu", dtype="float32"))
    seqs = sequences(model)
    expected = embedder.embed(seqs)
    tokens = embedder.tokenize(seqs)
    pad = getattr(embedder.tokenizer, "pad_id", 0)
    together = run_onnx(session, *pad_batch(tokens, pad))                            # mixed lengths, padded
    alone = np.concatenate([run_onnx(session, *pad_batch([t], pad)) for t in tokens])  # no padding
    assert together.shape == (len(seqs), output.shape[1] if isinstance(output.shape[1], int) else expected.shape[1])
    np.testing.assert_allclose(together, expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(alone, expected, atol=TOLERANCE, rtol=0)


def test_onnx_rejects_low_opset_and_broken_checkpoint(demo_checkpoints, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["onnx", "--model", "esm2", "--checkpoint", str(demo_checkpoints / "esm2"),
                 "--out", str(out), "--opset", "13"]) == 1
    assert "opset 13" in capsys.readouterr().err
    # a DNABERT-S folder is not an ESM-2 checkpoint: error, nothing written
    assert main(["onnx", "--model", "esm2", "--checkpoint", str(demo_checkpoints / "dnabert_s"),
                 "--out", str(out)]) == 1
    assert "not valid" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx.")]
