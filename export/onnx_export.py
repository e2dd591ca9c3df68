"""Export an encoder plus mean pooling to ONNX and verify it with onnxruntime against the model core.

Graph: input_ids [B, L] int64, attention_mask [B, L] int64 (1 = token, 0 = padding, right-padded)
-> embedding [B, hidden] float32, with dynamic B and L. It is the core's padded path
(`forward_padded`: position/ALiBi terms built in-graph from L), not the packed one: ONNX has
no variable-length attention, so what serves it computes the padding too.
"""
from __future__ import annotations

import dataclasses
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .checkpoints import ExportError, check_out_dir, load_checked

ONNX_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
PROTOBUF_LIMIT = 2**31 - 1           # one ModelProto; larger models keep tensors outside it
MIN_OPSET = 17
INPUT_NAMES, OUTPUT_NAME = ("input_ids", "attention_mask"), "embedding"
# Verification lengths in letters: short, typical and long, padded together in one batch.
VERIFY_LENGTHS = {"esm2": (7, 40, 95, 170), "dnabert_s": (12, 120, 333, 500)}


@dataclasses.dataclass(frozen=True)
class OnnxResult:
    """What was written and how closely onnxruntime reproduces the model core."""

    path: Path
    hidden_size: int
    external_data: bool
    bytes: int
    max_abs_diff: Optional[float]      # None when not verified
    sequences: int


def _pooled_module(encoder):
    import torch

    from embed_core.packing import mean_pool_padded

    class PooledEncoder(torch.nn.Module):
        """forward_padded + the model's mean pooling (ESM-2 skips BOS/EOS, DNABERT-S skips none)."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.skip_first = int(encoder.pool_skip_first)
            self.skip_last = int(encoder.pool_skip_last)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask > 0                                            # [B, L]
            hidden = self.encoder.forward_padded(input_ids, mask)                # [B, L, H]
            return mean_pool_padded(hidden, mask, self.skip_first, self.skip_last)  # [B, H]

    return PooledEncoder().eval()


def verification_sequences(kind: str, seed: int = 0) -> list[str]:
    """Deterministic mixed-length sequences of the model's alphabet (DNA includes an N)."""
    rng = random.Random(seed)
    if kind == "esm2":
        return ["M" + "".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=n - 1)) for n in VERIFY_LENGTHS[kind]]
    seqs = ["".join(rng.choices("ACGT", k=n)) for n in VERIFY_LENGTHS[kind]]
    return [s[:5] + "N" + s[6:] for s in seqs]


def pad_batch(token_arrays: Sequence, pad_id: int = 0):
    """Right-padded int64 (input_ids [B, L], attention_mask [B, L]) numpy arrays."""
    import numpy as np

    length = max(len(t) for t in token_arrays)
    ids = np.full((len(token_arrays), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_arrays), length), dtype=np.int64)
    for row, tokens in enumerate(token_arrays):
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    for name in ("pad_id", "pad_token_id", "padding_idx", "pad_idx"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0  # any id: padded positions are masked out of attention and pooling


def export_onnx(kind: str, checkpoint: Path, out_dir: Path, opset: int = MIN_OPSET,
                external_data: str = "auto", verify: bool = True, tolerance: float = 1e-4,
                overwrite: bool = False) -> OnnxResult:
    """Write out_dir/model.onnx (+ model.onnx.data when external); verify unless verify=False.

    Files are written to a temporary folder and moved into place only after verification
    passes, so a failed export leaves nothing behind.
    """
    import onnx  # noqa: F401  (both missing is said before a checkpoint is loaded)
    import torch  # noqa: F401

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET}: LayerNormalization and the attention ops need >= 17")
    if external_data not in ("auto", "always", "never"):
        raise ExportError(f"external_data must be auto, always or never, got {external_data!r}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    encoder, tokenizer = load_checked(kind, checkpoint)
    encoder = encoder.float().eval()
    pad_id = _pad_id(tokenizer)
    sequences = verification_sequences(kind)
    tokens = [tokenizer.encode(s) for s in sequences]
    # Trace on the two shortest (B=2, short L); verify on all of them padded together (other B
    # and L) and on each alone (no padding): proof that the batch and length axes are dynamic.
    example = pad_batch(tokens[:2], pad_id)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        traced = Path(tmp) / "traced" / ONNX_FILE
        traced.parent.mkdir()
        _trace(kind, _pooled_module(encoder), example, traced, opset)
        final = Path(tmp) / "final"
        final.mkdir()
        external = _save_checked(traced, final / ONNX_FILE, external_data)
        diff = None
        if verify:
            diff = _verify(kind, encoder, tokenizer, sequences, tokens, pad_id, final / ONNX_FILE, tolerance)
        _move_into_place(final, out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    return OnnxResult(out_dir / ONNX_FILE, int(encoder.hidden_size), external, size, diff, len(sequences))


def _trace(kind: str, module, example, path: Path, opset: int) -> None:
    """torch.onnx.export of `module` traced on `example`, with dynamic batch and length axes."""
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # constant ALiBi slopes: intended
            # The TorchScript exporter (dynamo=False) is deprecated, but it needs no onnxscript and
            # its dynamic_axes give the dynamic batch and length this graph needs.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module, tuple(torch.from_numpy(a) for a in example), str(path),
                dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                              "attention_mask": {0: "batch", 1: "length"},
                              OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as err:  # the tracer's errors are long: keep the first line, name the model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch.onnx.export of the {kind} encoder failed: {type(err).__name__}: {first}") from err


def _save_checked(traced: Path, target: Path, external_data: str) -> bool:
    """The traced model saved at `target` (its weights in DATA_FILE beside it when `external_data`
    says so, or "auto" finds them near protobuf's 2 GiB limit) and checked; True when external."""
    import onnx

    model = onnx.load(str(traced), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    external = external_data == "always" or (external_data == "auto" and weight_bytes > PROTOBUF_LIMIT - 2**26)
    if external:
        onnx.save_model(model, str(target), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(target))
    del model
    onnx.checker.check_model(str(target))
    return external


def _verify(kind: str, encoder, tokenizer, sequences: Sequence[str], tokens: Sequence, pad_id: int,
            path: Path, tolerance: float) -> float:
    """Max |diff| between onnxruntime on the exported graph (all sequences padded together, and
    each alone) and the model core; ExportError when it is not below `tolerance`."""
    import numpy as np
    from embed_core import Embedder, RuntimeConfig

    embedder = Embedder(encoder, tokenizer, RuntimeConfig(device="cpu", dtype="float32", token_budget=4096))
    try:
        reference = embedder.embed(sequences)
    finally:
        embedder.close()
    try:
        session = onnx_session(path)
        got = run_onnx(session, *pad_batch(tokens, pad_id))
        singles = np.concatenate([run_onnx(session, *pad_batch([t], pad_id)) for t in tokens])
    except Exception as err:  # typically a traced size baked into the graph as a constant
        raise ExportError(f"onnxruntime cannot run the exported {kind} graph on other batch sizes "
                          f"or lengths than the traced one: {type(err).__name__}: {err}") from err
    if got.shape != reference.shape:
        raise ExportError(f"ONNX output shape {got.shape} != model core {reference.shape}")
    diff = float(max(np.abs(got - reference).max(), np.abs(singles - reference).max()))
    if not diff < tolerance:
        raise ExportError(f"ONNX export of {kind} disagrees with the model core: max |diff| "
                          f"{diff:.3g} >= {tolerance:g} on {len(sequences)} sequences")
    return diff


def _move_into_place(final: Path, out_dir: Path) -> None:
    """The verified folder becomes `out_dir` (replacing it), readable by a container's server."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for path in final.iterdir():
        path.chmod(0o644)
    final.chmod(0o755)  # mkdtemp made it 0700; a container's server user must read it
    final.rename(out_dir)


def onnx_session(path: Path, threads: int = 2):
    """An onnxruntime CPU session on an exported model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, input_ids, attention_mask):
    """embedding [B, H] float32 for right-padded int64 inputs."""
    return session.run([OUTPUT_NAME], {"input_ids": input_ids, "attention_mask": attention_mask})[0]
