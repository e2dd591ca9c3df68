"""The VirNucPro MLP in numpy against torch (eval mode), its loaders, and the exact file formats."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from embed_client.classifier import (HIGHEST_FILE, PREDICTIONS_FILE, ClassifierError,
                                     PredictionWriter, from_state_dict, load_classifier)

torch = pytest.importorskip("torch", reason="the torch reference needs torch (test extra)")

DIM, HIDDEN = 3328, 512


class MLPClassifier(torch.nn.Module):
    """The original's class (prediction.py), the torch reference."""

    def __init__(self, input_dim=DIM, hidden_dim=HIDDEN, num_class=2):
        super().__init__()
        self.hidden_layer = torch.nn.Linear(input_dim, hidden_dim)
        self.bn1 = torch.nn.BatchNorm1d(hidden_dim)
        self.output_layer = torch.nn.Linear(hidden_dim, num_class)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.hidden_layer(x)))
        return self.output_layer(self.dropout(x))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MLPClassifier()
    with torch.no_grad():  # non-trivial running statistics, as after training
        m.bn1.running_mean.normal_(0, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.bn1.weight.normal_(1, 0.2)
        m.bn1.bias.normal_(0, 0.2)
        m.bn1.num_batches_tracked.fill_(100)
    return m.eval()


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(1).normal(size=(300, DIM)).astype(np.float32)


def reference(model, features):
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(features)), dim=1).numpy()


def save(model, path):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    elif path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt", ".pth"])
def test_numpy_matches_torch_eval(model, features, tmp_path, suffix):
    classifier = load_classifier(save(model, tmp_path / f"mlp{suffix}"))
    probs = classifier.predict_proba(features)
    assert probs.dtype == np.float32 and probs.shape == (len(features), 2)
    np.testing.assert_allclose(probs, reference(model, features), atol=1e-5, rtol=0)


def test_wrapped_and_prefixed_state_dicts(model, features, tmp_path):
    state = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": state}, path)
    probs = load_classifier(path).predict_proba(features)
    np.testing.assert_allclose(probs, reference(model, features), atol=1e-5, rtol=0)


def test_bad_state_dict_names_every_key(model):
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["bn1.running_var"]
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ClassifierError, match=r"missing: \['bn1.running_var'\].*extra.weight"):
        from_state_dict(state)


def test_width_mismatch_is_an_error(model):
    classifier = from_state_dict({k: v.numpy() for k, v in model.state_dict().items()})
    with pytest.raises(ClassifierError, match="width 3328"):
        classifier.predict_proba(np.zeros((2, 100), np.float32))


def test_pickled_module_needs_allow_pickle(model, features, tmp_path, monkeypatch):
    # The original saves the whole module with its class in __main__ (train.py).
    original = type("MLPClassifier", (MLPClassifier,), {"__module__": "__main__"})
    original.__qualname__ = "MLPClassifier"
    monkeypatch.setattr(sys.modules["__main__"], "MLPClassifier", original, raising=False)
    whole = original()
    whole.load_state_dict(model.state_dict())
    path = tmp_path / "300_model.pth"
    torch.save(whole.eval(), path)
    monkeypatch.delattr(sys.modules["__main__"], "MLPClassifier")

    with pytest.raises(ClassifierError, match="--allow-pickle"):
        load_classifier(path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        classifier = load_classifier(path, allow_pickle=True)
    assert not hasattr(sys.modules["__main__"], "MLPClassifier")  # the stand-in is removed
    np.testing.assert_allclose(classifier.predict_proba(features), reference(model, features),
                               atol=1e-5, rtol=0)


def test_prediction_files_exact_format(tmp_path):
    ids = ["s1_chunk_1F1", "s1_chunk_1R2", "s1_chunk_2F3", "s1_chunk_10F1", "s2_chunk_1R1",
           "s3_chunk_1F2"]
    probs = np.array([
        [0.12100612, 0.8789939],   # virus
        [0.75, 0.25],              # others
        [0.5, 0.5],                # a tie: torch.max takes index 0 -> others
        [0.9999, 1e-4],
        [3.5e-05, 0.999965],
        [0.6, 0.4],
    ], dtype=np.float32)
    writer = PredictionWriter(tmp_path)
    writer.add(ids[:4], probs[:4])
    assert not (tmp_path / PREDICTIONS_FILE).exists()  # nothing final before close()
    writer.add(ids[4:], probs[4:])
    assert writer.close() == {"frames": 6, "chunks": 5}

    text = (tmp_path / PREDICTIONS_FILE).read_text()
    assert text == (
        "Sequence_ID\tPrediction\tscore1\tscore2\n"
        "s1_chunk_1F1\tvirus\t0.12100612\t0.8789939\n"
        "s1_chunk_1R2\tothers\t0.75\t0.25\n"
        "s1_chunk_2F3\tothers\t0.5\t0.5\n"
        "s1_chunk_10F1\tothers\t0.9999\t1e-04\n"  # numpy's str of float32(1e-4)
        "s2_chunk_1R1\tvirus\t3.5e-05\t0.999965\n"
        "s3_chunk_1F2\tothers\t0.6\t0.4\n")
    # pandas groupby order (string sort), Is_Virus = max(score2) >= max(score1) per chunk
    assert (tmp_path / HIGHEST_FILE).read_text() == (
        "Modified_ID\tIs_Virus\n"
        "s1_chunk_1\tTrue\n"
        "s1_chunk_10\tFalse\n"
        "s1_chunk_2\tTrue\n"
        "s2_chunk_1\tTrue\n"
        "s3_chunk_1\tFalse\n")


def test_scores_print_as_numpy_float32(tmp_path, model, features):
    """Each score is str() of the float32 value, as the original's '\\t'.join(map(str, row))."""
    probs = reference(model, features[:20])
    writer = PredictionWriter(tmp_path)
    writer.add([f"r{i}_chunk_1F1" for i in range(20)], probs)
    writer.close()
    rows = (tmp_path / PREDICTIONS_FILE).read_text().splitlines()[1:]
    for row, p in zip(rows, probs):
        _, label, s1, s2 = row.split("\t")
        assert [s1, s2] == "\t".join(map(str, p)).split("\t")
        assert label == ("virus" if int(np.argmax(p)) == 1 else "others")


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_corrupt_weights_file_is_a_classifier_error(tmp_path, suffix):
    path = tmp_path / f"300_model{suffix}"
    path.write_bytes(b"not a weights file at all")
    with pytest.raises(ClassifierError, match="cannot read classifier file"):
        load_classifier(path)
