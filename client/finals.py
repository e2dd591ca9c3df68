"""The final files of a run, written from its committed parts: `<model>.parquet` and
merged.parquet (and the classifier's features) for a run of means (`finalize_means`, `derive`);
for a run that asks more than the means (--include bos/per_token, --with-sequence,
--repr-layer) `<model>.parquet` with its extra columns and, for per_token,
`<model>.per_token.h5`. Every file is written as `*.partial` and renamed, so nothing partial
looks finished; the parts are removed once all are in place.

Why HDF5 for per-token rows: they are a [tokens, hidden] matrix per sequence, and what the field
reads them with is h5py, one dataset per sequence named by its id (bio_embeddings, ProtTrans'
per-residue files, many pipelines built on ESM): `f[id][:]` is that sequence's matrix, read on
its own (no scan of the other rows), from any language with an HDF5 library. The parts stay
Parquet (one file per model per block: the manifest, checksums and --resume are unchanged);
this module writes the HDF5 file from them at the end, as it writes the Parquet finals.

File layout: `<model>.per_token.h5`, attributes model, hidden, layer, include, sample; one
float32 dataset [tokens, hidden] per sequence in input order (the file tracks creation order),
named by its id with "%" and "/" written %25 and %2F (HDF5 names cannot hold "/"), its
attribute `id` the id as given. ESM-2's rows are the residues (no BOS/EOS); DNABERT-S's every
BPE token with [CLS] and [SEP]: exactly the tokens the mean in `<model>.parquet` averages.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import numpy as np

from .errors import OutputError, OutputWriteError
from .integrity import CorruptPart, read_part
from .layout import MERGE_ORDER, MERGED_FILE, PARTS_DIR
from .representations import part_schema, token_rows
from .tables import aligned, embedding_schema, embedding_table, vectors

if TYPE_CHECKING:   # sink.py imports this module: OutputDir is only named in annotations here
    from .sink import OutputDir

log = logging.getLogger("embed_client")

PER_TOKEN_SUFFIX = ".per_token.h5"


def per_token_name(model: str) -> str:
    """The key of a per-token file in the final rows (and its file name)."""
    return model + PER_TOKEN_SUFFIX


def dataset_name(seq_id: str) -> str:
    """The HDF5 dataset name of an id ("/" and "%" escaped; "." alone is HDF5's own name)."""
    name = seq_id.replace("%", "%25").replace("/", "%2F")
    return "%2E" if name == "." else name


def needs_own_finals(options) -> bool:
    return tuple(options.include) != ("mean",) or options.with_sequence or options.layer != -1


def lacks_per_token(out: OutputDir, options, summary: dict) -> bool:
    """A finished run asked per-token rows and a per-token file is gone or incomplete (its
    parts were removed: the run is computed again, as for a missing per-model file)."""
    if "per_token" not in options.include:
        return False
    frames = int(summary.get("stages", {}).get("prep", {}).get("frames", -1))
    for model in options.models:
        try:
            import h5py

            with h5py.File(out.path / per_token_name(model), "r") as handle:
                if len(handle) == frames:
                    continue
        except (OSError, ValueError):
            pass
        log.warning("resume: %s is missing or incomplete; recomputing", per_token_name(model))
        return True
    return False


def finalize(out: OutputDir, options, hidden: Dict[str, int],
             on_features: Optional[Callable[[List[str], np.ndarray], None]] = None
             ) -> Dict[str, int]:
    """The run's final files from its committed parts; rows per file (as OutputDir.finalize)."""
    if not needs_own_finals(options):
        return out.finalize(options.models, hidden, options.merged, on_features)
    try:
        rows = _write(out, options, hidden)
    except CorruptPart as e:
        raise _changed_part(e, out) from None
    if options.merged or on_features is not None:   # from the final files, as a finished run
        rows.update(derive(out, hidden, options.merged, on_features))
    shutil.rmtree(out.path / PARTS_DIR, ignore_errors=True)
    return rows


def _write(out: OutputDir, options, hidden: Dict[str, int]) -> Dict[str, int]:
    """`<model>.parquet` (+ `<model>.per_token.h5`) for every model, as *.partial renamed."""
    import pyarrow.parquet as pq

    per_token = "per_token" in options.include
    meta = {"sample": out.config.sample, "chunk": str(out.config.chunk),
            "include": ",".join(options.include), "layer": str(options.layer)}
    targets = {m: out.final_path(m) for m in options.models}
    if per_token:
        targets.update({per_token_name(m): out.path / per_token_name(m) for m in options.models})
    rows = {name: 0 for name in targets}
    writers, h5 = {}, {}
    with _partials(targets) as (temps, handles):
        for model in options.models:
            schema = part_schema(hidden[model], options.include, options.with_sequence)
            if per_token:
                schema = schema.remove(schema.get_field_index("per_token"))
                h5[model] = _open_h5(temps[per_token_name(model)],
                                     {**meta, "model": model, "hidden": hidden[model]})
                handles.append(h5[model])
            writers[model] = pq.ParquetWriter(temps[model], schema.with_metadata(
                {**meta, "model": model, "hidden": str(hidden[model])}))
            handles.append(writers[model])
        for number, record in sorted(out.blocks.items()):
            for model in options.models:
                table = read_part(out.part_path(model, number), record.sha256.get(model))
                if per_token:
                    rows[per_token_name(model)] += _write_tokens(h5[model], table)
                    table = table.drop_columns(["per_token"])
                writer = writers[model]
                writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
                rows[model] += table.num_rows
    return rows


@contextmanager
def _partials(targets: Dict[str, Path]):
    """({name: `<target>.partial`}, a list for the handles written to them): when the block
    ends the handles are closed and each partial renamed onto its target; when it fails the
    handles are closed and the partials removed, so nothing partial looks finished."""
    temps = {name: path.with_name(path.name + ".partial") for name, path in targets.items()}
    handles: list = []
    try:
        yield temps, handles
        for handle in handles:
            handle.close()
        handles.clear()
        for name, target in targets.items():
            os.replace(temps[name], target)
    except BaseException:
        for handle in handles:
            handle.close()
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()
        raise


def _open_h5(path, attrs: dict):
    import h5py

    handle = h5py.File(path, "w", track_order=True)
    for key, value in attrs.items():
        handle.attrs[key] = value
    return handle


def _write_tokens(handle, table) -> int:
    """One part's per-token rows into the HDF5 file, a dataset per sequence; returns how many."""
    offsets, values = token_rows(table.column("per_token"))
    ids = table.column("id").to_pylist()
    for i, seq_id in enumerate(ids):
        dataset = handle.create_dataset(dataset_name(seq_id),
                                        data=values[offsets[i]:offsets[i + 1]])
        dataset.attrs["id"] = seq_id
    return len(ids)


# ------------------------------------------------------------------ a run of means


def _changed_part(error: CorruptPart, out: OutputDir) -> OutputWriteError:
    return OutputWriteError(f"{error}: it changed after it was committed, so no final file "
                            f"was written; continue with --resume --out {out.path} to "
                            f"recompute it")


def finalize_means(out: OutputDir, models: Sequence[str], hidden: Dict[str, int], merged: bool,
                   on_features: Optional[Callable[[List[str], np.ndarray], None]] = None
                   ) -> Dict[str, int]:
    """Stream the committed blocks, in order, into the final files; returns rows per file.

    `on_features(ids, features)` receives each block's merged DNABERT-S + ESM-2 features
    (the classifier). Each part is checked against its checksum as it is read: a corrupted
    one stops the run before any final or derived file is in place (OutputWriteError; a
    --resume recomputes it). Parts are removed once every final file is in place.
    """
    def tables():
        for number, record in sorted(out.blocks.items()):
            yield number, {m: read_part(out.part_path(m, number), record.sha256.get(m))
                           for m in models}

    try:
        rows = _write_means(out, tables(), models, hidden, merged, on_features)
    except CorruptPart as e:
        raise _changed_part(e, out) from None
    shutil.rmtree(out.path / PARTS_DIR, ignore_errors=True)
    return rows


def derive(out: OutputDir, hidden: Dict[str, int], merged: bool,
           on_features: Optional[Callable[[List[str], np.ndarray], None]] = None,
           batch_rows: int = 8192) -> Dict[str, int]:
    """merged.parquet and/or `on_features` from the final per-model files of a finished
    run (its parts are gone); the per-model files are only read. Returns rows written."""
    import pyarrow.parquet as pq

    readers = {m: pq.ParquetFile(out.final_path(m)) for m in MERGE_ORDER}

    def tables():
        batches = {m: r.iter_batches(batch_size=batch_rows) for m, r in readers.items()}
        for number, chunk in enumerate(aligned(batches)):
            yield f"rows from {number * batch_rows}", chunk

    return _write_means(out, tables(), (), hidden, merged, on_features)


def _write_means(out: OutputDir, tables, models: Sequence[str], hidden: Dict[str, int],
                 merged: bool, on_features) -> Dict[str, int]:
    """Write `<model>.parquet` for `models` and merged.parquet (`merged`) from (label,
    {model: table}) in frame order, all as *.partial renamed at the end."""
    import pyarrow.parquet as pq

    meta = {"sample": out.config.sample, "chunk": str(out.config.chunk)}
    writers = {}
    targets = {model: out.final_path(model) for model in models}
    need_features = merged or on_features is not None
    if need_features:
        width = sum(hidden[m] for m in MERGE_ORDER)
    if merged:
        targets["merged"] = out.path / MERGED_FILE
    rows = {name: 0 for name in targets}
    with _partials(targets) as (temps, handles):
        for model in models:
            schema = embedding_schema(hidden[model], {**meta, "model": model,
                                                      "hidden": str(hidden[model])})
            writers[model] = pq.ParquetWriter(temps[model], schema)
            handles.append(writers[model])
        if merged:
            schema = embedding_schema(width, {**meta, "models": ",".join(MERGE_ORDER),
                                              "hidden": str(width)})
            writers["merged"] = pq.ParquetWriter(temps["merged"], schema)
            handles.append(writers["merged"])
        for label, block in tables:
            for model in models:
                table = block[model].replace_schema_metadata(writers[model].schema.metadata)
                writers[model].write_table(table)
                rows[model] += table.num_rows
            if need_features:
                _write_features(label, block, writers.get("merged"), rows, on_features)
    return rows


def _write_features(label, block, merged_writer, rows: Dict[str, int], on_features) -> None:
    """One block's DNABERT-S + ESM-2 features (VirNucPro's order) into merged.parquet (when
    `merged_writer`) and to `on_features`; the models' frame ids must agree."""
    ids = block[MERGE_ORDER[0]].column("id").to_pylist()
    for model in MERGE_ORDER[1:]:
        if block[model].column("id").to_pylist() != ids:
            raise OutputError(f"block {label}: the models' frame ids differ")
    features = np.hstack([vectors(block[m]) for m in MERGE_ORDER])
    if merged_writer is not None:
        lengths = block[MERGE_ORDER[0]].column("length").to_numpy()
        merged_writer.write_table(embedding_table(ids, features, lengths, merged_writer.schema))
        rows["merged"] += len(ids)
    if on_features is not None:
        on_features(ids, features)
