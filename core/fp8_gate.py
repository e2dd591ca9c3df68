"""The fp8 plans' accuracy gate: fp8 against fp32 on the user's own weights, refused below a threshold.

e4m3 has three mantissa bits; whether a checkpoint's embeddings survive them depends on its
weights and its activation outliers, which random weights cannot tell (issue 17). So every fp8
plan measures itself on the checkpoint it serves: the same sequences embedded with the fp8 plan
and with the fp32 reference (the encoder's weights as served, computed in fp32, PyTorch eager,
padded attention), the cosine of each sequence's pooled embedding, and the plan refused
(`Fp8GateError`, a ValueError) when the smallest is below the threshold (default 0.999;
RuntimeConfig.fp8_min_cosine, config parameter `fp8_min_cosine`).

* `Embedder.warmup()` runs `gate(embedder)` for an fp8 plan on `bundled_sequences` (32, cheap:
  one fp32 pass over ~3-6k tokens on the device; the encoder is cast to fp32 and back in place,
  exactly, as its weights are bf16 then). The server log states the result (`Fp8Check.describe`).
* `dtype: fp8-auto`: `pick(embedder)` runs that gate on each of fp8.candidates in turn and keeps
  the first plan that passes (the server log names it).
* `embed-export check-fp8` (embed_export.checkpoints.check_fp8) runs `measure` on more of them (160) or on the user's FASTA,
  for each fp8 plan, and prints the figures.

`with_outlier_channels(esm2)` builds the checkpoint the gate must refuse (tests, perf/e2e.py).

The bundled sequences are synthetic, made here from a fixed seed: proteins of 40-170 residues
with UniProt's amino-acid background frequencies, DNA chunks of 100-300 bp (uniform bases). A
user's own FASTA (their real inputs) is the better test; the gate takes one.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .fp8 import DEFAULT_MIN_COSINE, candidates
from .plan import ExecutionPlan, linears_for

log = logging.getLogger(__name__)

GATE_SEQUENCES = 32        # at load
CHECK_SEQUENCES = 160      # embed-export check-fp8
# UniProtKB/Swiss-Prot amino-acid composition (%), A C D E F G H I K L M N P Q R S T V W Y.
_AMINO = "ACDEFGHIKLMNPQRSTVWY"
_AMINO_FREQ = np.array([8.25, 1.38, 5.46, 6.72, 3.86, 7.07, 2.27, 5.91, 5.80, 9.65,
                        2.41, 4.06, 4.74, 3.93, 5.53, 6.64, 5.35, 6.86, 1.10, 2.92])


class Fp8GateError(ValueError):
    """An fp8 plan measured below its threshold on this checkpoint."""


@dataclasses.dataclass(frozen=True)
class Fp8Check:
    """One gate measurement: the plan, how many sequences, the cosines, the threshold."""

    plan: str
    sequences: int
    min_cosine: float
    mean_cosine: float
    threshold: float

    @property
    def passed(self) -> bool:
        return bool(self.min_cosine >= self.threshold)

    def describe(self) -> str:
        return (f"fp8 gate ({self.plan}): pooled embeddings vs fp32 on {self.sequences} sequences: min cosine "
                f"{self.min_cosine:.5f}, mean {self.mean_cosine:.5f} (threshold {self.threshold:g}): "
                f"{'passed' if self.passed else 'REFUSED'}")


def bundled_sequences(kind: str, n: int = GATE_SEQUENCES, seed: int = 17) -> list:
    """n synthetic sequences for `kind` ("esm2": proteins, "dnabert_s": DNA), the same every time."""
    rng = np.random.default_rng(seed)
    if kind == "esm2":
        lengths = rng.integers(40, 171, size=n)
        p = _AMINO_FREQ / _AMINO_FREQ.sum()
        return ["".join(rng.choice(list(_AMINO), size=int(k), p=p)) for k in lengths]
    if kind == "dnabert_s":
        return ["".join(rng.choice(list("ACGT"), size=int(k))) for k in rng.integers(100, 301, size=n)]
    raise ValueError(f"no bundled sequences for model kind {kind!r}")


def read_fasta(path: Union[str, Path], limit: Optional[int] = None) -> list:
    """The sequences of a FASTA file (headers dropped, lines joined), the first `limit` of them."""
    out, current = [], []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith(">"):
            if current:
                out.append("".join(current))
            current = []
        elif line:
            current.append(line)
    if current:
        out.append("".join(current))
    if not out:
        raise ValueError(f"{path}: no sequences")
    return out[:limit] if limit else out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of a and b [N, H] (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)


def reference_embeddings(embedder, token_arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The embedder's encoder run in fp32 (PyTorch eager, padded attention) on its device, then put
    back in its plan's dtype and plan (in place: bf16 -> fp32 -> bf16 is exact)."""
    encoder, plan = embedder.encoder, embedder.plan
    reference = ExecutionPlan(device=plan.device, dtype=torch.float32, attention="padded")
    try:
        encoder.to(torch.float32)
        encoder.prepare(reference)
        with torch.inference_mode():
            return embedder.embed_tokens(token_arrays)
    finally:
        encoder.to(plan.dtype)
        encoder.prepare(plan)


def measure(embedder, token_arrays: Sequence[np.ndarray], threshold: float = DEFAULT_MIN_COSINE,
            reference: Optional[np.ndarray] = None) -> Fp8Check:
    """The embedder's plan against the fp32 reference on `token_arrays` (`reference`: those
    embeddings already computed, the same for every plan)."""
    out = embedder.embed_tokens(token_arrays)
    cos = cosines(out, reference_embeddings(embedder, token_arrays) if reference is None else reference)
    return Fp8Check(plan=embedder.plan.linears, sequences=len(cos), min_cosine=float(cos.min()),
                    mean_cosine=float(cos.mean()), threshold=float(threshold))


def switch(embedder, linears: str) -> None:
    """The embedder and its encoder moved to the fp8 plan `linears` (ValueError where the encoder
    cannot run it), the rest of its plan kept."""
    linears = linears_for(linears, embedder.device, embedder.encoder)
    if embedder.plan.linears != linears:
        embedder.plan = dataclasses.replace(embedder.plan, linears=linears)
        embedder.encoder.prepare(embedder.plan)


def _bundled_arrays(embedder) -> list:
    kind = "esm2" if type(embedder.encoder).__name__ == "ESM2" else "dnabert_s"
    return embedder.tokenize(bundled_sequences(kind))


def pick(embedder) -> Fp8Check:
    """fp8-auto: each of fp8.candidates(encoder) in turn (`switch`), measured as `gate` measures
    (one fp32 reference for all); the first that passes stays and is returned. None passes:
    Fp8GateError with every plan's figures (the embedder is left on the last one tried)."""
    token_arrays = _bundled_arrays(embedder)
    reference = reference_embeddings(embedder, token_arrays)
    checks = []
    for linears in candidates(embedder.encoder):
        switch(embedder, linears)
        check = measure(embedder, token_arrays, embedder.config.fp8_min_cosine, reference)
        log.info("%s: fp8-auto: %s", type(embedder.encoder).__name__, check.describe())
        checks.append(check)
        if check.passed:
            return check
    raise Fp8GateError("fp8-auto: no fp8 plan passes on this checkpoint: "
                       + "; ".join(c.describe() for c in checks)
                       + ": serve it with dtype bfloat16, or lower fp8_min_cosine knowingly")


def gate(embedder) -> Fp8Check:
    """measure() on the bundled sequences of the encoder's kind; Fp8GateError with the figures when
    below the embedder's RuntimeConfig.fp8_min_cosine."""
    check = measure(embedder, _bundled_arrays(embedder), embedder.config.fp8_min_cosine)
    log.info("%s: %s", type(embedder.encoder).__name__, check.describe())
    if not check.passed:
        raise Fp8GateError(f"{check.describe()}: this checkpoint loses too much in fp8; serve it with dtype "
                           f"bfloat16 (or another fp8 plan that passes: embed-export check-fp8), or lower "
                           f"fp8_min_cosine knowingly")
    return check


def with_outlier_channels(encoder, channels=(3, 17, 40, 51), factor=1e5):
    """An ESM-2 encoder changed in place to break per-token e4m3 (the gate must refuse it): activation
    outliers as trained transformers grow them, a few channels of every LayerNorm's output scaled up
    by `factor` and the next linear's input columns scaled down by it, so the fp32 function is
    unchanged but each token's e4m3 scale is set by the outliers and the other channels fall into
    e4m3's subnormals (measured on the demo model: x3e4 still passes fp8-ffn at 0.9993, x1e5 fails
    both plans at ~0.992; e4m3 keeps 3 mantissa bits over a 2^15 range of normals, so per-token
    scales survive milder outliers)."""
    with torch.no_grad():
        for layer in encoder.encoder.layer:
            for norm, nxt in ((layer.attention.LayerNorm, (layer.attention.self.query, layer.attention.self.key,
                                                           layer.attention.self.value)),
                              (layer.LayerNorm, (layer.intermediate.dense,))):
                norm.weight[list(channels)] *= factor
                norm.bias[list(channels)] *= factor
                for linear in nxt:
                    linear.weight[:, list(channels)] /= factor
    return encoder
