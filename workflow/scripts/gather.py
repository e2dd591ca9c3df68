"""Gather every sample's embed-client summary.json into one TSV (Snakemake `script:`).

One row per sample, in sample-sheet order: status, records, chunks, frames, the rows each
model wrote, rejected sequences, resumed frames, time. Missing fields (an older or newer
client) are left empty rather than failing the gather.
"""
import csv
import json
import sys

COLUMNS = ["sample", "status", "records_in_file", "records_kept", "records_skipped", "chunks",
           "frames", "esm2_rows", "dnabert_s_rows", "rejected", "resumed_frames", "elapsed_s",
           "send_elapsed_s", "sequences_per_s", "out"]


def get(data, *path):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return ""
        data = data[key]
    return "" if data is None else data


def row(sample, summary):
    stages = summary.get("stages", {})
    write = stages.get("write", {})
    send = stages.get("send", {})
    return {
        "sample": sample,
        "status": get(summary, "status"),
        "records_in_file": get(stages, "read", "records_in_file"),
        "records_kept": get(stages, "read", "records_kept"),
        "records_skipped": get(stages, "read", "records_skipped"),
        "chunks": get(stages, "prep", "chunks"),
        "frames": get(stages, "prep", "frames"),
        "esm2_rows": get(write, "esm2", "rows_final"),
        "dnabert_s_rows": get(write, "dnabert_s", "rows_final"),
        "rejected": sum(int(get(send, m, "rejected") or 0) for m in send),
        "resumed_frames": get(summary, "resumed", "frames"),
        "elapsed_s": get(summary, "elapsed_s"),
        "send_elapsed_s": get(summary, "send_elapsed_s"),
        "sequences_per_s": get(summary, "throughput", "sequences_per_s"),
        "out": get(summary, "out"),
    }


def gather(samples, summaries, table):
    rows = [row(s, json.loads(open(p, encoding="utf-8").read())) for s, p in zip(samples, summaries)]
    with open(table, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__" and "snakemake" in globals():
    sm = globals()["snakemake"]
    with open(sm.log[0], "w", encoding="utf-8") as log:
        rows = gather(sm.params.samples, sm.input.summaries, sm.output.table)
        print(f"{len(rows)} samples -> {sm.output.table}", file=log)
elif __name__ == "__main__":
    # standalone: gather.py TABLE SAMPLE=SUMMARY.json ...
    pairs = [a.split("=", 1) for a in sys.argv[2:]]
    gather([p[0] for p in pairs], [p[1] for p in pairs], sys.argv[1])
