"""Arrow/Parquet tables of embeddings: the schema, building a table, reading them in step."""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence

import numpy as np

from .errors import OutputError


def embedding_schema(hidden: int, metadata: Optional[Dict[str, str]] = None):
    import pyarrow as pa

    schema = pa.schema([
        ("id", pa.string()),
        ("embedding", pa.list_(pa.float32(), hidden)),
        ("length", pa.int32()),
    ])
    return schema.with_metadata(metadata) if metadata else schema


def embedding_table(ids: Sequence[str], embeddings: np.ndarray, lengths: Sequence[int],
                    schema):
    """A table (id, embedding fixed_size_list<float32>[hidden], length int32)."""
    import pyarrow as pa

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    hidden = embeddings.shape[1]
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), hidden)
    return pa.Table.from_arrays(
        [pa.array(list(ids), pa.string()), vectors, pa.array(lengths, pa.int32())],
        schema=schema)


def aligned(batches: Dict[str, Iterator]) -> Iterator[Dict[str, object]]:
    """Tables of equal row counts, one per name, from record-batch iterators of equal totals."""
    import pyarrow as pa

    pending = {name: None for name in batches}
    while True:
        for name, it in batches.items():
            while pending[name] is None or pending[name].num_rows == 0:
                batch = next(it, None)
                if batch is None:
                    pending[name] = None
                    break
                pending[name] = pa.Table.from_batches([batch])
        ended = [name for name, table in pending.items() if table is None]
        if ended:
            if len(ended) != len(pending):
                raise OutputError(f"the final files differ in rows: {', '.join(ended)} ended "
                                  "before the others")
            return
        n = min(table.num_rows for table in pending.values())
        yield {name: table.slice(0, n) for name, table in pending.items()}
        pending = {name: table.slice(n) for name, table in pending.items()}


def vectors(table) -> np.ndarray:
    """The embedding column of a table as a [n, hidden] float32 array (no copy if possible)."""
    column = table.column("embedding").combine_chunks()
    hidden = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, hidden)
