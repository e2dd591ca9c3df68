"""End-to-end scenario (issue 5): a synthetic sample through embed-server + embed-client, one command.

    python3 perf/e2e.py --out $OUT                       # GPU host: ESM-2 3B + DNABERT-S, real size
    python3 perf/e2e.py --small --out /tmp/e2e           # CPU: demo-size models, a few hundred reads

The phases, in one process tree, each in its own module beside this one:
 1. e2e_setup: preflight (every module the parent, the client and the server's stub need, named at
    once: exit 3), --model-param checked (exit 2), the device and the run's config;
 2. e2e_sample: a synthetic sample shaped like the real workload (reads of 150-500 bp, 60% cut from
    stop-free codon runs at GC 0.56) and its frames, computed with the client's own VirNucPro prep;
 3. e2e_checkpoints: random checkpoints at the real sizes, written in the published layouts, and a
    model repository with exact embedding dims;
 4. e2e_server: embed-server in a subprocess (PATH=$STUB_PATH:$PATH when set, so the Python stub
    sees numpy<2: docs/triton.md);
 5. e2e_passes: embed-client on the sample (the mixed run: both models' instances time-slice each
    GPU; /metrics sampled every second by e2e_metrics), then once per model alone; the server stops;
 6. e2e_fp8 (--fp8-plans; on a GPU with FP8 by default): the server again under each fp8 plan (the
    same passes), every plan's rows against fp32 per sequence, the accuracy gate refusing a
    checkpoint built to break it;
 7. e2e_baselines: the same frames through the model core in-process (the ceiling) and a prefix
    through transformers' EsmModel bf16 SDPA, length-sorted (the plain baseline);
 8. e2e_report, e2e_plot: the targets judged, one table, e2e.json (rewritten after every phase),
    a PNG of tokens/s per GPU over the run, and the client's and server's logs.

perf/README.md says how each figure is measured and lists every option.

Exit codes: 0 the run completed (targets PASS or FAIL are printed; --strict: 4 when one FAILs),
1 the run failed (server, client, counts), 2 usage, 3 a required module is missing.
"""
from __future__ import annotations

import shutil
import sys
import time
import traceback

from e2e_baselines import run_baselines
from e2e_checkpoints import repository_phase
from e2e_common import ALL_FIGURES, TARGETS, Failure, Scenario  # noqa: F401  (the figure names, for tests)
from e2e_fp8 import fp8_phases, plans_to_run
from e2e_options import build_parser, defaults
from e2e_passes import alone_passes, mixed_pass
from e2e_plot import plot_run
from e2e_report import evaluate_targets, print_table, scaling
from e2e_sample import sample_phase
from e2e_server import start_server, stop_server
from e2e_setup import check_before_start, open_device


def run_phases(s: Scenario) -> int:
    """Every phase in order; returns the exit code of a run that got to the end."""
    sample, dna_sample, frames = sample_phase(s)
    repo = repository_phase(s)
    start_server(s, repo)
    e2e_rows = mixed_pass(s, sample, frames)
    alone_passes(s, sample, dna_sample, frames)
    stop_server(s)
    if s.fp8_plans:
        fp8_phases(s, s.fp8_plans, sample, dna_sample, frames, e2e_rows)
    if not s.args.skip_baselines:
        run_baselines(s, frames, e2e_rows)
    scaling(s.args, s.report)
    s.report["targets"] = evaluate_targets(s.report["figures"], s.args.small)
    s.report["status"] = "complete" if s.report["counts_match"] else "counts mismatch"
    if not s.report["counts_match"]:
        return 1
    if s.args.strict and any(t["status"] == "FAIL" for t in s.report["targets"].values()):
        return 4
    return 0


def failed(s: Scenario, error: BaseException) -> int:
    """The exit code of a run that stopped early; the figures so far stay in the report."""
    if isinstance(error, KeyboardInterrupt):
        s.report["status"] = "interrupted"
        return 130
    s.report["status"] = "failed"
    if isinstance(error, Failure):
        s.report["notes"].append(str(error).splitlines()[0])
        print(f"e2e: FAILED: {error}", file=sys.stderr, flush=True)
    else:   # a bug or an environment problem
        s.report["notes"].append(f"{type(error).__name__}: {error}"[:500])
        print("e2e: FAILED with an unexpected error:\n" + "".join(traceback.format_exc(limit=-8))[-4000:],
              file=sys.stderr, flush=True)
    return 1


def tear_down(s: Scenario) -> None:
    """Whatever happened: the sampler and server stopped, the plot and the report written, the
    temporary scratch folder removed."""
    if s.sampler is not None:
        s.sampler.abandon()
    if s.server is not None:
        s.server.stop()
    s.report["phases"]["total"] = round(time.monotonic() - s.t_start, 1)
    plot_run(s)
    s.save()
    if not s.args.keep_workdir and not s.args.workdir:
        shutil.rmtree(s.workdir, ignore_errors=True)


def run(args) -> int:
    s = Scenario.start(defaults(args))
    code = check_before_start(s)
    if code:
        return code
    open_device(s)
    try:
        s.fp8_plans = plans_to_run(s)
        code = run_phases(s)
    except (Exception, KeyboardInterrupt) as e:   # Failure, a bug, or Ctrl-C: the figures so far are kept
        code = failed(s, e)
    finally:
        tear_down(s)
    if s.report["status"] in ("complete", "counts mismatch"):
        print_table(s.report)
    plot = s.report.get("plot")
    print(f"e2e: {s.report['status']}; wrote {s.json_path}" + (f", {plot['path']}" if plot else ""), flush=True)
    return code


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
