"""The VirNucPro MLP in numpy, its weight loaders, and the two prediction files.

The network (the original's `MLPClassifier`, eval mode): Linear(D -> 512) -> BatchNorm1d(512)
with its running statistics -> ReLU -> Dropout (identity at inference) -> Linear(512 -> 2) ->
softmax. D = DNABERT-S hidden + ESM-2 hidden (768 + 2560 = 3328 for the published models).

Weights: a state dict with the original's names (`hidden_layer.*`, `bn1.*`, `output_layer.*`,
an optional `module.` prefix) from `.safetensors` or `.npz` (no torch), or a torch `.pt`/`.pth`
state dict (torch imported here only, `weights_only=True`). The original ships a pickled whole
module (`torch.save(model)`); that loads only with `allow_pickle=True` (it runs pickle code).

Output formats, inferred from the original `prediction.py` (Li-Jing-1997/VirNucPro):
- `prediction_results.txt`: header `Sequence_ID\\tPrediction\\tscore1\\tscore2`, one row per
  frame; the scores are the float32 softmax row written with `str()` of numpy float32
  (shortest round-trip repr, e.g. `0.12100612`, `3.5e-05`), as `'\\t'.join(map(str, row))`
  does on `probabilities.cpu().numpy()`. Prediction = `torch.max(probs, 1)` index mapped
  {0: others, 1: virus}; torch returns the first maximum on a tie, so a tie is `others`.
- `prediction_results_highestscore.csv`: pandas `groupby("Modified_ID")` (sorted keys) then
  `to_csv(sep="\\t", index=False)`: header `Modified_ID\\tIs_Virus`, rows sorted by the chunk id
  as strings, `Is_Virus` = `True`/`False` from max(score2) >= max(score1) over the chunk's
  frames. The original compares the scores re-read from the text file; the shortest repr
  round-trips, so comparing the float32 values gives the same answer.
Row order of `prediction_results.txt`: ours is the input (frame) order; the original's is that
order only up to 10,000 frames (it concatenates its split files in `os.listdir` order).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import ClassifierError
from .layout import MERGE_ORDER

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "prediction_results.txt"
HIGHEST_FILE = "prediction_results_highestscore.csv"
LABELS = ("others", "virus")  # class index -> Prediction, as the original's label_map
BN_EPS = 1e-5                 # torch.nn.BatchNorm1d default; not stored in a state dict

_KEYS = {
    "w1": "hidden_layer.weight",
    "b1": "hidden_layer.bias",
    "bn_weight": "bn1.weight",
    "bn_bias": "bn1.bias",
    "bn_mean": "bn1.running_mean",
    "bn_var": "bn1.running_var",
    "w2": "output_layer.weight",
    "b2": "output_layer.bias",
}
_IGNORED = {"bn1.num_batches_tracked"}


@dataclass(frozen=True)
class Classifier:
    """The VirNucPro MLP's eval-mode parameters as float32 arrays."""

    w1: np.ndarray        # [hidden, D]
    b1: np.ndarray        # [hidden]
    bn_weight: np.ndarray
    bn_bias: np.ndarray
    bn_mean: np.ndarray
    bn_var: np.ndarray
    w2: np.ndarray        # [2, hidden]
    b2: np.ndarray        # [2]
    bn_eps: float = BN_EPS

    def __post_init__(self):
        if self.w1.ndim != 2:
            raise ClassifierError(f"classifier weights: w1 has shape {self.w1.shape}, expected "
                                  "[hidden, features]")
        hidden, dim = self.w1.shape
        expect = {
            "b1": (hidden,), "bn_weight": (hidden,), "bn_bias": (hidden,),
            "bn_mean": (hidden,), "bn_var": (hidden,), "w2": (2, hidden), "b2": (2,),
        }
        bad = [f"{name} {getattr(self, name).shape} (expected {shape})"
               for name, shape in expect.items() if getattr(self, name).shape != shape]
        if bad:
            raise ClassifierError("classifier weights have inconsistent shapes: " + ", ".join(bad))

    @property
    def input_dim(self) -> int:
        return int(self.w1.shape[1])

    def require_width(self, widths: Mapping[str, int], source: str, path) -> None:
        """ClassifierError unless the classifier (read from `path`) takes the merged features
        of models of these `widths` (given by `source`, e.g. the servers)."""
        width = sum(widths[m] for m in MERGE_ORDER)
        if self.input_dim != width:
            raise ClassifierError(
                f"classifier {path} takes {self.input_dim} features, but {source} give {width} ("
                + " + ".join(f"{m} {widths[m]}" for m in MERGE_ORDER) + ")")

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Softmax class probabilities [N, 2] float32 (column 0 others, 1 virus) for [N, D]."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ClassifierError(
                f"classifier expects features of width {self.input_dim}, got shape {x.shape}")
        h = x @ self.w1.T + self.b1                                   # [N, hidden]
        scale = self.bn_weight / np.sqrt(self.bn_var + np.float32(self.bn_eps))
        h = (h - self.bn_mean) * scale + self.bn_bias                 # BatchNorm1d, eval
        h = np.maximum(h, np.float32(0))                              # ReLU; dropout = identity
        logits = h @ self.w2.T + self.b2                              # [N, 2]
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


def from_state_dict(state: Mapping[str, np.ndarray], bn_eps: float = BN_EPS) -> Classifier:
    """A Classifier from a state dict with the original's names; errors list every mismatch."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    missing = [key for key in _KEYS.values() if key not in state]
    unexpected = sorted(set(state) - set(_KEYS.values()) - _IGNORED)
    if missing or unexpected:
        raise ClassifierError(
            "classifier state dict does not match the VirNucPro MLP "
            f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'})")
    arrays = {field: np.ascontiguousarray(np.asarray(state[key], dtype=np.float32))
              for field, key in _KEYS.items()}
    return Classifier(**arrays, bn_eps=float(bn_eps))


def load_classifier(path: Path, allow_pickle: bool = False) -> Classifier:
    """Read classifier weights from .safetensors, .npz, or a torch .pt/.pth file."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"classifier file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ClassifierError(
                "reading .safetensors needs the `safetensors` package "
                "(pip install safetensors)") from e
        return from_state_dict(_read_state(path, lambda: load_file(str(path))))
    if suffix == ".npz":
        def read_npz():
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        return from_state_dict(_read_state(path, read_npz))
    if suffix in (".pt", ".pth"):
        return _load_torch(path, allow_pickle)
    raise ClassifierError(
        f"classifier file {path}: unknown format {suffix!r} "
        "(expected .safetensors, .npz, .pt or .pth)")


def _read_state(path: Path, read) -> Dict[str, np.ndarray]:
    """`read()`, with a corrupt or unreadable file reported as a ClassifierError."""
    try:
        return read()
    except Exception as e:  # safetensors, zipfile and numpy each raise their own types
        raise ClassifierError(f"cannot read classifier file {path}: {type(e).__name__}: {e}") from e


def _load_torch(path: Path, allow_pickle: bool) -> Classifier:
    """A torch state dict (weights_only) or, with allow_pickle, the original's pickled module."""
    try:
        import torch
    except ImportError as e:
        raise ClassifierError(
            f"reading {path.name} needs torch: install the extra `pip install "
            "'virnuc-embed[core]'` or convert the weights to .safetensors/.npz") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for a whole module; anything else is bad
        if not allow_pickle:
            raise ClassifierError(
                f"{path} is not a plain state dict ({type(e).__name__}); if it is the original "
                "VirNucPro model file (a pickled whole module), pass --allow-pickle to load it "
                "(this runs code from the file: only for files you trust)") from e
        obj = _load_pickled_module(torch, path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        return from_state_dict({k: v.detach().cpu().numpy() for k, v in obj.items()
                                if hasattr(v, "detach")})
    if isinstance(obj, torch.nn.Module):
        return _from_module(obj)
    raise ClassifierError(f"{path} holds a {type(obj).__name__}, not a state dict")


def _load_pickled_module(torch, path: Path):
    """Unpickle `torch.save(model)` of the original, whose class is `__main__.MLPClassifier`."""
    warnings.warn(
        f"loading {path} with weights_only=False (--allow-pickle): this executes pickled code",
        stacklevel=3)
    log.warning("loading %s as a pickled module (--allow-pickle)", path)
    main = sys.modules["__main__"]
    injected = not hasattr(main, "MLPClassifier")
    if injected:
        main.MLPClassifier = _torch_mlp_class(torch)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ClassifierError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from e
    finally:
        if injected:
            del main.MLPClassifier


def _torch_mlp_class(torch):
    """A stand-in for the original's `MLPClassifier`; unpickling restores its submodules."""

    class MLPClassifier(torch.nn.Module):
        def forward(self, x):
            x = torch.relu(self.bn1(self.hidden_layer(x)))
            return self.output_layer(self.dropout(x))

    return MLPClassifier


def _from_module(module) -> Classifier:
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    bn = getattr(module, "bn1", None)
    return from_state_dict(state, bn_eps=getattr(bn, "eps", BN_EPS))


# ------------------------------------------------------------------ prediction files


def _chunk_max(table):
    """Per chunk id, the maximum of each score (pandas' groupby max in the original)."""
    out = table.group_by("Modified_ID").aggregate([("score1", "max"), ("score2", "max")])
    return out.select(["Modified_ID", "score1_max", "score2_max"]).rename_columns(
        ["Modified_ID", "score1", "score2"])


def predictions_of(probs: np.ndarray) -> List[str]:
    """`others`/`virus` per row: the first maximum wins, as torch.max (a tie is `others`)."""
    return [LABELS[i] for i in np.argmax(probs, axis=1)]


def write_with_predictions(classifier: Optional[Classifier], out_dir: Path,
                           write: Callable) -> Tuple[object, Optional[Dict[str, int]]]:
    """(write(on_features), the prediction counts or None): with a classifier, every block of
    merged features that `write` hands to on_features is classified into the prediction files,
    which are removed again when anything fails (the error goes on to the caller)."""
    if classifier is None:
        return write(None), None
    writer = PredictionWriter(out_dir)
    try:
        rows = write(lambda ids, x: writer.add(ids, classifier.predict_proba(x)))
        return rows, writer.close()
    except BaseException:
        writer.abort()
        raise


class PredictionWriter:
    """Writes prediction_results.txt row by row and the per-chunk file at `close`.

    Files are written under temporary names and renamed at `close`, so a run that stops
    early leaves no file that looks finished.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self._tmp = self.out_dir / (PREDICTIONS_FILE + ".partial")
        self._fh = open(self._tmp, "w", encoding="utf-8", newline="")
        self._fh.write("Sequence_ID\tPrediction\tscore1\tscore2\n")
        self._chunk_tables: list = []   # per add(): (Modified_ID, max score1, max score2)
        self.rows = 0

    def add(self, ids: Sequence[str], probs: np.ndarray) -> None:
        """Append one row per frame id (probs [N, 2] float32, in the ids' order)."""
        import pyarrow as pa

        probs = np.asarray(probs, dtype=np.float32)
        # str(np.float32) is the original's number format (see the module docstring).
        # f"{x}" of a numpy float32 formats the float64 value: use str() explicitly.
        self._fh.writelines(f"{seq_id}\t{label}\t{str(row[0])}\t{str(row[1])}\n"
                            for seq_id, label, row in zip(ids, predictions_of(probs), probs))
        self.rows += len(ids)
        table = pa.table({"Modified_ID": pa.array([i[:-2] for i in ids], pa.string()),
                          "score1": pa.array(probs[:, 0]), "score2": pa.array(probs[:, 1])})
        self._chunk_tables.append(_chunk_max(table))

    def close(self) -> Dict[str, int]:
        """Finish both files (atomic renames); returns row counts."""
        import pyarrow as pa

        self._fh.close()
        if self._chunk_tables:
            chunks = _chunk_max(pa.concat_tables(self._chunk_tables)).sort_by("Modified_ID")
        else:
            chunks = pa.table({"Modified_ID": pa.array([], pa.string()),
                               "score1": pa.array([], pa.float32()),
                               "score2": pa.array([], pa.float32())})
        highest_tmp = self.out_dir / (HIGHEST_FILE + ".partial")
        with open(highest_tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write("Modified_ID\tIs_Virus\n")
            for batch in chunks.to_batches(max_chunksize=65536):
                ids = batch.column("Modified_ID").to_pylist()
                is_virus = (batch.column("score2").to_numpy() >= batch.column("score1").to_numpy())
                fh.writelines(f"{c}\t{bool(v)}\n" for c, v in zip(ids, is_virus))
        os.replace(self._tmp, self.out_dir / PREDICTIONS_FILE)
        os.replace(highest_tmp, self.out_dir / HIGHEST_FILE)
        return {"frames": self.rows, "chunks": chunks.num_rows}

    def abort(self) -> None:
        """Drop the partial files (a failed run presents no predictions)."""
        if not self._fh.closed:
            self._fh.close()
        for name in (PREDICTIONS_FILE, HIGHEST_FILE):
            with_partial = self.out_dir / (name + ".partial")
            if with_partial.exists():
                with_partial.unlink()
