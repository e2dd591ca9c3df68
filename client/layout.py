"""The output directory's file names, in one place so that the modules that write, check and
read them agree."""

from __future__ import annotations

# Layout of `--out DIR`:
#     run.json                 what the run is (sample, chunk, models, window, hidden sizes)
#     manifest.jsonl           one line per committed block (append-only, fsynced), with the
#                              sha256 of each of its parts
#     parts/<model>/block-NNNNNNNN.parquet   one part per model per committed block
#     <model>.parquet          final per-model table (written at the end, then parts removed)
#     merged.parquet           optional: DNABERT-S then ESM-2 features per frame (--merged)
#     summary.json             counts per stage; "status": "complete" only when all matched
#     stdin.input              the input read from standard input (`--sample -`), spooled first
#     .lock                    held (flock) while a client writes the directory

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.jsonl"
SUMMARY_FILE = "summary.json"
STDIN_FILE = "stdin.input"   # `--sample -`: standard input spooled here before the run (inputs.py)
PARTS_DIR = "parts"
LOCK_FILE = ".lock"
MERGED_FILE = "merged.parquet"
MERGE_ORDER = ("dnabert_s", "esm2")  # VirNucPro's feature order: nucleotide first
FORMAT_VERSION = 1
