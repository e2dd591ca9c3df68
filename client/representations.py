"""What a run asks beyond the mean (--include bos,per_token, --repr-layer, --with-sequence), and
the rows the answers add to a block's parts.

The server takes a request's KServe parameters `{"include": "mean,per_token,bos", "layer": N}`
and answers BOS [n, H], TOKEN_EMBEDDINGS [n, longest, H] (zero-padded) and TOKEN_COUNT [n, 1]
beside EMBEDDING (core/serving.py). Per-token rows are exactly the tokens the mean averages:
ESM-2's residues (BOS/EOS left out), every DNABERT-S token ([CLS] and [SEP] in). `layer` follows
fair-esm's repr_layers: 0 = the embeddings, k = after k layers, -1 = the last (the default).

A block's part (sink.py) then holds, beside id, embedding and length: `bos`
(fixed_size_list<float32>[H]), `sequence` (the text sent) and `per_token`
(list<fixed_size_list<float32>[H]>), so the manifest, checksums and --resume work unchanged;
finals.py turns the parts into the final files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from embed_core.alphabets import INCLUDE_CHOICES

from .errors import ServerError

ALIASES = {"per_tok": "per_token"}          # fair-esm's extract.py spelling
EXTRA_OUTPUTS = {"bos": ("BOS",), "per_token": ("TOKEN_EMBEDDINGS", "TOKEN_COUNT")}


def parse_include(text: str) -> Tuple[str, ...]:
    """`mean,per_token,bos` (any order, fair-esm's `per_tok` accepted) as a tuple in
    INCLUDE_CHOICES order; the mean is always in. ValueError names an unknown word."""
    words = {ALIASES.get(w.strip(), w.strip()) for w in text.split(",") if w.strip()}
    unknown = words - set(INCLUDE_CHOICES)
    if unknown:
        raise ValueError(f"--include: {', '.join(sorted(unknown))} is not one of "
                         f"{','.join(INCLUDE_CHOICES)}")
    return tuple(w for w in INCLUDE_CHOICES if w in words | {"mean"})


class Answer(NamedTuple):
    """One request's rows: means [n, H], and where asked BOS rows [n, H] and per-token rows."""

    mean: np.ndarray
    bos: Optional[np.ndarray]
    tokens: Optional[List[np.ndarray]]      # per sequence [count_i, H]


@dataclass(frozen=True)
class Ask:
    """What every request asks beyond the default (the last layer's mean)."""

    include: Tuple[str, ...] = ("mean",)
    layer: int = -1

    @classmethod
    def of(cls, include: Sequence[str], layer: int) -> Optional["Ask"]:
        """None for the default (requests then carry no parameters, as before)."""
        ask = cls(tuple(include), int(layer))
        return None if ask == cls() else ask

    @property
    def parameters(self) -> Dict[str, object]:
        return {"include": ",".join(self.include), "layer": self.layer}

    @property
    def extra_outputs(self) -> Tuple[str, ...]:
        return tuple(name for key in self.include for name in EXTRA_OUTPUTS.get(key, ()))

    def missing_outputs(self, outputs: Sequence[str]) -> List[str]:
        """The outputs asked for that a model's config lacks (an older server)."""
        return [name for name in self.extra_outputs if name not in outputs]

    def answer(self, result, mean: np.ndarray, url: str) -> Answer:
        """The Answer of an InferResult whose means are `mean` [n, H] (shapes checked)."""
        n, hidden = mean.shape
        bos = tokens = None
        if "bos" in self.include:
            bos = result.as_numpy("BOS")
            if bos is None or bos.shape != (n, hidden):
                raise ServerError(f"server {url}: BOS has shape "
                                  f"{None if bos is None else bos.shape}, expected {(n, hidden)}")
            bos = bos.astype(np.float32, copy=False)
        if "per_token" in self.include:
            padded, counts = result.as_numpy("TOKEN_EMBEDDINGS"), result.as_numpy("TOKEN_COUNT")
            if (padded is None or counts is None or padded.ndim != 3 or padded.shape[0] != n
                    or padded.shape[2] != hidden or counts.reshape(-1).shape != (n,)
                    or (n and int(counts.max()) > padded.shape[1])):
                raise ServerError(f"server {url}: TOKEN_EMBEDDINGS/TOKEN_COUNT have shapes "
                                  f"{getattr(padded, 'shape', None)}/{getattr(counts, 'shape', None)} "
                                  f"for {n} sequences of width {hidden}")
            padded = padded.astype(np.float32, copy=False)
            tokens = [padded[i, :int(c)] for i, c in enumerate(counts.reshape(-1))]
        return Answer(mean, bos, tokens)


def part_schema(hidden: int, include: Sequence[str], with_sequence: bool):
    """A part's schema: id, embedding, length, then bos, sequence, per_token where asked."""
    import pyarrow as pa

    fields = [("id", pa.string()), ("embedding", pa.list_(pa.float32(), hidden)),
              ("length", pa.int32())]
    if "bos" in include:
        fields.append(("bos", pa.list_(pa.float32(), hidden)))
    if with_sequence:
        fields.append(("sequence", pa.string()))
    if "per_token" in include:
        fields.append(("per_token", pa.list_(pa.list_(pa.float32(), hidden))))
    return pa.schema(fields)


def _vectors(rows: np.ndarray, hidden: int):
    import pyarrow as pa

    rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows), hidden)


class BlockRows:
    """The rows an open block collects beyond its means, per model, in block order."""

    def __init__(self, size: int, models: Sequence[str], hidden: Dict[str, int],
                 include: Sequence[str], with_sequence: bool):
        self.include = tuple(include)
        self.with_sequence = with_sequence
        self.hidden = hidden
        self.bos = ({m: np.zeros((size, hidden[m]), np.float32) for m in models}
                    if "bos" in include else {})
        self.tokens: Dict[str, list] = ({m: [None] * size for m in models}
                                        if "per_token" in include else {})

    @classmethod
    def of(cls, size: int, models: Sequence[str], hidden: Dict[str, int],
           include: Sequence[str], with_sequence: bool) -> Optional["BlockRows"]:
        """None when the run asks nothing beyond the means (the parts stay as before)."""
        if tuple(include) == ("mean",) and not with_sequence:
            return None
        return cls(size, models, hidden, include, with_sequence)

    def store(self, model: str, rows: Sequence[int], answer: Answer) -> None:
        if answer.bos is not None:
            self.bos[model][rows] = answer.bos
        if answer.tokens is not None:
            held = self.tokens[model]
            for row, tokens in zip(rows, answer.tokens):
                held[row] = np.array(tokens)          # a copy: the answer's buffer goes

    def tables(self, block, tables: Dict[str, tuple]) -> Dict[str, object]:
        """The parts of `block` from its (embeddings, lengths) per model."""
        return {model: self.table(model, block.frame_ids, embeddings, lengths,
                                  [item.text for item in block.items[model]])
                for model, (embeddings, lengths) in tables.items()}

    def table(self, model: str, ids: Sequence[str], embeddings: np.ndarray,
              lengths: Sequence[int], texts: Sequence[str]):
        """The block's part for `model` (part_schema), in block order."""
        import pyarrow as pa

        hidden = embeddings.shape[1]
        schema = part_schema(hidden, self.include, self.with_sequence)
        columns = [pa.array(list(ids), pa.string()), _vectors(embeddings, hidden),
                   pa.array(lengths, pa.int32())]
        if "bos" in self.include:
            columns.append(_vectors(self.bos[model], hidden))
        if self.with_sequence:
            columns.append(pa.array(list(texts), pa.string()))
        if "per_token" in self.include:
            rows = self.tokens[model]
            offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
            values = (np.concatenate(rows) if rows else np.zeros((0, hidden), np.float32))
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), _vectors(values, hidden)))
        return pa.Table.from_arrays(columns, schema=schema)


def token_rows(column) -> Tuple[np.ndarray, np.ndarray]:
    """A per_token column as (offsets [n + 1], rows [K, H] float32): sequence i's rows are
    rows[offsets[i]:offsets[i + 1]]."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    hidden = column.type.value_type.list_size
    offsets = column.offsets.to_numpy()
    values = column.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, hidden)
    return offsets - offsets[0], values[offsets[0]:offsets[-1]]
