"""perf/e2e.py --small end to end on CPU (its own real tritonserver, demo-size models, a few hundred
reads): the JSON carries every figure and target, the counts match (frames prepped = frames the
client read = embeddings written = sequences the server counted, per model), the embeddings the
server returned equal the in-process ones, the server's per-phase seconds fit in Triton's execute
time, --model-param reaches the repository and the in-process baseline. And perf/compare.py: a
figure 15% worse is flagged, 5% worse passes; totals of runs on different GPU counts are not
compared, nor a model's tokens/s per GPU from its pass alone with one from the mixed run."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    """perf/<name>.py as a module (perf/ is not a package; e2e.py imports its siblings the same way)."""
    if str(ROOT / "perf") not in sys.path:
        sys.path.insert(0, str(ROOT / "perf"))
    return importlib.import_module(name)


@pytest.mark.server
def test_e2e_small_end_to_end(tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="the scenario's client needs tritonclient[grpc]")
    pytest.importorskip("transformers", reason="the plain baseline needs transformers")
    e2e = load("e2e")
    out = tmp_path / "out"
    # attention=padded is the CPU default (same work), token_budget a server-only parameter: both pass
    # through without changing what is measured.
    command = [sys.executable, str(ROOT / "perf" / "e2e.py"), "--small", "--reads", "200", "--out", str(out),
               "--workdir", str(tmp_path / "work"), "--model-param", "dnabert_s:attention=padded",
               "--model-param", "dnabert_s:token_budget=4096", "--dnabert-copies", "2",
               "--fp8-plans", "fp8"]   # the fp8 phases too (on the CPU: e4m3 math through _scaled_mm)
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, f"e2e.py exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads((out / "e2e.json").read_text())
    assert report["status"] == "complete"

    figures = report["figures"]
    missing = [k for k in e2e.ALL_FIGURES if k not in figures]
    assert not missing, f"figures absent from e2e.json: {missing}"
    unmeasured_on_cpu = {"gpu_util_mean", "scaling_vs_one_gpu", "scaling_efficiency", "per_gpu_token_spread",
                         "per_gpu_token_balance"}
    nulls = [k for k in e2e.ALL_FIGURES if figures[k] is None and k not in unmeasured_on_cpu]
    assert not nulls, f"figures not measured: {nulls}"
    assert figures["gpus"] == 1 and figures["gpu_util_samples"] == 0
    for key in ("e2e_frames_per_s", "esm2_tokens_per_s_per_gpu", "dnabert_s_tokens_per_s_per_gpu",
                "esm2_alone_tokens_per_s_per_gpu", "inprocess_esm2_tokens_per_s", "inprocess_dnabert_s_tokens_per_s",
                "hf_esm2_tokens_per_s"):
        assert figures[key] > 0, key
    assert 0 < figures["e2e_over_inprocess"] and figures["overhead"] == pytest.approx(1 - figures["e2e_over_inprocess"])
    assert set(report["targets"]) == set(e2e.TARGETS)
    assert all(t["status"].startswith("n/a") for t in report["targets"].values())

    # The targets are judged on each model's pass alone; the mixed run's figures stay reported.
    for m in ("esm2", "dnabert_s"):
        assert figures[f"{m}_tokens_per_s_per_gpu"] == figures[f"{m}_alone_tokens_per_s_per_gpu"], m

    # Counts: frames in == embeddings out, per model, in the mixed run and in each pass alone.
    frames = report["workload"]["frames"]
    assert frames > 200  # ~1.3 frames per read
    passes = {"esm2", "dnabert_s", "dnabert_s alone", "esm2 alone"}
    assert set(report["counts"]) == passes | {f"{name} fp8" for name in passes}
    for name, counts in report["counts"].items():   # the DNABERT-S pass sent the reads twice
        assert set(counts.values()) == {frames * (2 if name.startswith("dnabert_s alone") else 1)}, (name, counts)
    assert report["counts_match"] is True
    assert figures["esm2_sequences_server"] == figures["dnabert_s_sequences_server"] == frames
    assert figures["esm2_tokens"] == report["workload"]["esm2_tokens"]   # residues + BOS/EOS per frame

    # Where the instances' execute time went: decode+tokenize and the encoder call, both inside
    # Triton's own execute time (compute_infer) on a CPU, where the forwards run while execute
    # queues them (on a GPU the answering thread's wait overlaps the next execute), per model in
    # the mixed run and in each pass alone.
    for prefix in ("esm2_", "dnabert_s_", "dnabert_s_alone_", "esm2_alone_"):
        prep, compute, execute = (figures[f"{prefix}server_{k}_s"] for k in ("prep", "compute", "execute"))
        assert 0 < prep and 0 < compute and prep + compute <= execute, (prefix, prep, compute, execute)
    for label in ("ESM-2 tokens/s per GPU (alone, / exec time)", "ESM-2 alone: prep | compute | execute s",
                  "DNABERT-S tokens/s per GPU (alone, / exec time)", "DNABERT-S alone: prep | compute | execute s",
                  "mixed run ESM-2: tokens/s per GPU wall | exec", "mixed run: both models' instances time-slice"):
        assert label in run.stdout, label
    assert (out / "e2e_client_esm2.log").exists() and (out / "e2e_client_dnabert_s.log").exists()

    # --model-param: in both configs of the repository, recorded, and the in-process baseline runs the
    # same attention (a RuntimeConfig choice) but not the server-only token budget.
    config = report["config"]
    assert config["model_params"] == {"dnabert_s": {"attention": "padded", "token_budget": "4096"}}
    assert config["inprocess_overrides"] == {"esm2": {}, "dnabert_s": {"attention": "padded"}}
    assert config["instances_per_gpu"] is None                    # not given: as the configs say ...
    assert config["instances"] == {"esm2": 1, "dnabert_s": 1}      # ... which --small sets to 1 CPU instance
    assert report["inprocess"]["models"]["dnabert_s"]["runtime_overrides"] == {"attention": "padded"}
    for name in ("config.pbtxt", "configs/cpu.pbtxt"):
        text = (tmp_path / "work" / "repository" / "dnabert_s" / name).read_text()
        assert '"padded"' in text and '"4096"' in text, name
    assert "dnabert_s:attention=padded dnabert_s:token_budget=4096" in run.stdout
    assert any("token_budget set on the server only" in note for note in report["notes"])

    # Same weights and same math on every path (fp32 on CPU).
    assert all(v is not None and v > 0.999 for v in report["cosine"].values()), report["cosine"]
    assert (out / "e2e_tokens_per_gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["timeline"] and (out / "e2e_client.log").exists() and (out / "e2e_tritonserver.log").exists()
    assert "Triton+client overhead" in run.stdout and "counts (prepped" in run.stdout

    # The fp8 plan through its own server: its figures, its rows against fp32 (close, not equal), the
    # gate's figures from the server's log, and the gate refusing the checkpoint built to break it,
    # in embed-export's check and in the server, which does not come up.
    assert figures["esm2_fp8_tokens_per_s_per_gpu"] > 0 and figures["fp8_reads_1m_s"] > 0
    for m in ("esm2", "dnabert_s"):
        assert figures[f"{m}_default_cos_fp32_min"] > 0.9999                # fp32 on the CPU: the same math
        assert 0.99 < figures[f"{m}_fp8_cos_fp32_min"] < 0.99999, m         # e4m3 linears: close, not equal
        gate = report["fp8_gate"]["fp8"][m]
        assert gate["verdict"] == "passed" and gate["sequences"] == 32 and 0.99 < gate["min_cosine"] < 1
        # the client's summary.json names the plan each model ran and what its gate measured
        (served,) = report["served"]["fp8"].values()
        assert served["dtype"][m] == "fp8" and served["fp8_gate"][m]["plan"] == "fp8"
        assert served["fp8_gate"][m]["min_cosine"] == pytest.approx(gate["min_cosine"], abs=1e-5)
    refusal = report["gate_refusal"]
    assert all(c["passed"] for c in refusal["checks"]["demo"])
    assert [c["plan"] for c in refusal["checks"]["demo with outliers"] if not c["passed"]] == ["fp8", "fp8-ffn"]
    assert refusal["refused"] and refusal["server"]["fp8"]["gate"]["verdict"] == "REFUSED"
    smooth = {c["plan"]: c for c in refusal["checks"]["demo with outliers"]}["fp8-smooth"]
    assert smooth["passed"] and refusal["smooth_served"]   # the outliers smoothed into the weights
    assert "embed-server on it: dtype fp8 REFUSED to load, fp8-smooth served" in run.stdout

    # The run's own JSON is a valid baseline for compare.py, and it equals itself.
    compare = load("compare")
    assert compare.main([str(out / "e2e.json"), "--baseline", str(out / "e2e.json")]) == 0


@pytest.mark.parametrize("option, words", [
    ("dnabert_s:atention=flex", ["dnabert_s", "'atention'"]),     # a key the configs lack
    ("dnabert_s:attention=sparse", ["dnabert_s", "attention", "'sparse'"]),  # a value the core refuses
    ("esm3:dtype=float32", ["esm3"]),                              # not a model
    ("dnabert_s=flex", ["MODEL:KEY=VALUE"]),
])
def test_e2e_refuses_a_bad_model_param_with_exit_2(tmp_path, option, words):
    """Before anything slow (sample, checkpoints, server) starts."""
    assert_usage_error(tmp_path, ["--model-param", option], words)
    assert not (tmp_path / "out" / "e2e_tritonserver.log").exists()


def assert_usage_error(tmp_path: Path, options: list, words: list) -> None:
    """e2e.py --small with `options` exits 2 and its stderr names every one of `words`."""
    command = [sys.executable, str(ROOT / "perf" / "e2e.py"), "--small", "--out", str(tmp_path / "out"), *options]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    for word in words:
        assert word in run.stderr, (word, run.stderr)


def _figures(path: Path, **figures) -> Path:
    path.write_text(json.dumps({"schema": "e2e/1", "figures": figures}))
    return path


def test_compare_flags_15_percent_worse_and_passes_5_percent(tmp_path, capsys):
    compare = load("compare")
    base = _figures(tmp_path / "base.json", gpus=1, e2e_frames_per_s_per_gpu=1000.0, reads_1m_s=300.0,
                    inprocess_over_hf_esm2=1.9, overhead=0.03, hf_esm2_tokens_per_s=None)
    ok = _figures(tmp_path / "ok.json", gpus=1, e2e_frames_per_s_per_gpu=950.0, reads_1m_s=315.0,
                  inprocess_over_hf_esm2=1.9 * 0.95, hf_esm2_tokens_per_s=46000.0)
    assert compare.main([str(ok), "--baseline", str(base)]) == 0
    assert "none more than 10% worse" in capsys.readouterr().out

    for name, value in (("e2e_frames_per_s_per_gpu", 850.0),       # higher is better: 15% lower
                        ("reads_1m_s", 345.0),                      # lower is better: 15% longer
                        ("inprocess_over_hf_esm2", 1.9 * 0.85)):    # a same-run ratio, 15% lower
        figures = {"gpus": 1, "e2e_frames_per_s_per_gpu": 1000.0, "reads_1m_s": 300.0,
                   "inprocess_over_hf_esm2": 1.9, name: value}
        bad = _figures(tmp_path / f"bad_{name}.json", **figures)
        assert compare.main([str(bad), "--baseline", str(base)]) == 1, name
        out = capsys.readouterr().out
        assert f"more than 10% worse: {name}" in out
    rows = {r[0]: r for r in compare.compare({"x": 1}, {"hf_esm2_tokens_per_s": 5.0})}
    assert rows["hf_esm2_tokens_per_s"][5] == "skipped (no baseline)"


def test_compare_target_rates_only_like_with_like():
    """A model's tokens/s per GPU from its pass alone is not compared with one from the mixed run
    (a baseline from before the ESM-2 pass): skipped with the reason; the mixed figures still compare."""
    compare = load("compare")
    base = {"gpus": 1, "esm2_tokens_per_s_per_gpu": 98_000.0, "esm2_tokens_per_s_per_gpu_mixed": 98_000.0,
            "dnabert_s_tokens_per_s_per_gpu": 1.2e6, "dnabert_s_alone_tokens_per_s_per_gpu_wall": 1.2e6}
    new = {"gpus": 1, "esm2_tokens_per_s_per_gpu": 80_000.0, "esm2_alone_tokens_per_s_per_gpu_wall": 79_000.0,
           "esm2_tokens_per_s_per_gpu_mixed": 97_000.0,
           "dnabert_s_tokens_per_s_per_gpu": 1.0e6, "dnabert_s_alone_tokens_per_s_per_gpu_wall": 1.0e6}
    rows = {r[0]: r for r in compare.compare(base, new)}
    assert rows["esm2_tokens_per_s_per_gpu"][5] == "skipped (baseline from the mixed run, run from the pass alone)"
    assert rows["esm2_tokens_per_s_per_gpu_mixed"][5] == "ok"
    assert rows["dnabert_s_tokens_per_s_per_gpu"][5] == "WORSE"          # both from the pass alone
    assert rows["esm2_alone_tokens_per_s_per_gpu_wall"][5] == "skipped (no baseline)"
    # A run without the DNABERT-S pass (--skip-dnabert-pass) has only the mixed run's lower bound.
    del new["dnabert_s_alone_tokens_per_s_per_gpu_wall"]
    rows = {r[0]: r for r in compare.compare(base, new)}
    assert rows["dnabert_s_tokens_per_s_per_gpu"][5] == "skipped (baseline from the pass alone, run from the mixed run)"
    # Both runs from the pass alone: compared as usual.
    base["esm2_alone_tokens_per_s_per_gpu_wall"] = 97_000.0
    rows = {r[0]: r for r in compare.compare(base, new)}
    assert rows["esm2_tokens_per_s_per_gpu"][5] == "WORSE"


def test_compare_ratios_only_and_gpu_counts(tmp_path):
    compare = load("compare")
    base = {"gpus": 1, "e2e_frames_per_s": 1000.0, "e2e_frames_per_s_per_gpu": 1000.0, "gpu_util_mean": 0.95}
    new = {"gpus": 2, "e2e_frames_per_s": 1500.0, "e2e_frames_per_s_per_gpu": 750.0, "gpu_util_mean": 0.94}
    rows = {r[0]: r for r in compare.compare(base, new)}
    assert rows["e2e_frames_per_s"][5].startswith("skipped (1 vs 2 GPUs")   # totals: other GPU count
    assert rows["e2e_frames_per_s_per_gpu"][5] == "WORSE"
    assert rows["gpu_util_mean"][5] == "ok"
    rows = {r[0]: r for r in compare.compare(base, new, ratios_only=True)}
    assert rows["e2e_frames_per_s_per_gpu"][5] == "skipped (--ratios-only)" and rows["gpu_util_mean"][5] == "ok"


def test_baseline_json_and_figure_names_agree():
    e2e, compare = load("e2e"), load("compare")
    assert set(compare.FIGURES) <= set(e2e.ALL_FIGURES)
    baseline = json.loads((ROOT / "perf" / "baseline.json").read_text())
    assert set(compare.FIGURES) <= set(baseline["figures"])
    assert compare.main([str(ROOT / "perf" / "baseline.json")]) == 0   # nulls: nothing compared, nothing worse


@pytest.mark.parametrize("value, words", [
    ("0", ["whole number >= 1"]),
    ("esm3=2", ["unknown model 'esm3'"]),
    ("dnabert_s=two", ["whole number >= 1"]),
])
def test_e2e_refuses_bad_instance_counts_with_exit_2(tmp_path, value, words):
    assert_usage_error(tmp_path, ["--instances-per-gpu", value], words)
