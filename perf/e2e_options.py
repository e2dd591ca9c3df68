"""perf/e2e.py's command line: the options, their defaults, and the checks of --model-param and
--instances-per-gpu that must fail (exit 2) before anything slow starts."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Dict, Optional

from e2e_common import MODELS

DESCRIPTION = "End-to-end scenario (issue 5): a synthetic sample through embed-server + embed-client, one command."


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def instance_counts(text: str):
    """--instances-per-gpu: N (every model) or MODEL=N[,MODEL=N] (those models; others as configured)."""
    if "=" not in text:
        return positive_int(text)
    counts = {}
    for part in text.split(","):
        model, _, value = part.partition("=")
        if model.strip() not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {model.strip()!r} in {text!r} "
                                             f"(models: {', '.join(MODELS)})")
        counts[model.strip()] = positive_int(value.strip())
    return counts


def parse_model_param(text: str) -> tuple:
    """--model-param MODEL:KEY=VALUE -> (model, key, value); whether the key exists is checked in run()."""
    model, colon, setting = text.partition(":")
    key, equals, value = setting.partition("=")
    if not colon or not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected MODEL:KEY=VALUE (e.g. dnabert_s:attention=flex), got {text!r}")
    if model not in MODELS:
        raise argparse.ArgumentTypeError(f"model must be one of {', '.join(MODELS)}, got {model!r} in {text!r}")
    return model, key.strip(), value.strip()


def inprocess_overrides(params: dict) -> dict:
    """The --model-param entries of one model that the in-process baseline takes too: those naming a
    RuntimeConfig field whose value is a name (attention, kernels, dtype, too_long; not device), looked
    up at run time so fields the core adds later pass through. Numeric ones (token_budget,
    max_length: "auto" or a number in the config) set the server only; an empty value means the
    default on both sides."""
    from embed_core.runtime import RuntimeConfig
    named = {f.name for f in dataclasses.fields(RuntimeConfig) if isinstance(f.default, str) and f.name != "device"}
    return {k: v for k, v in params.items() if k in named and v}


def model_params_problem(model_params: dict) -> Optional[str]:
    """Why the --model-param values cannot run (a key the model's configs lack, a value the core
    refuses), or None; checked before anything slow starts."""
    from embed_core.runtime import RuntimeConfig
    from embed_server.repository import check_parameters
    try:
        check_parameters(model_params, MODELS)
    except ValueError as e:
        return f"--model-param: {e}"
    for model, params in model_params.items():
        try:
            RuntimeConfig(**inprocess_overrides(params))
        except ValueError as e:
            return f"--model-param {model}: {e}"
    return None


def model_params_text(model_params: dict) -> str:
    """{model: {key: value}} as the MODEL:KEY=VALUE words of --model-param ("defaults" when none)."""
    words = [f"{m}:{k}={v}" for m, kv in sorted(model_params.items()) for k, v in kv.items()]
    return " ".join(words) or "defaults"


def instances_text(instances: Dict[str, int]) -> str:
    return ", ".join(f"{m} {n}" for m, n in instances.items()) or "-"


def fp8_plans(text: str) -> str:
    """--fp8-plans: auto, none, or a comma list of fp8 plans."""
    from embed_core.fp8 import PLANS
    if text in ("auto", "none"):
        return text
    plans = [p.strip() for p in text.split(",") if p.strip()]
    wrong = [p for p in plans if p not in PLANS]
    if not plans or wrong:
        raise argparse.ArgumentTypeError(f"expected auto, none or plans among {', '.join(PLANS)}, got {text!r}")
    return ",".join(dict.fromkeys(plans))


def defaults(args) -> argparse.Namespace:
    """Fills the defaults that depend on --small, and gathers --model-param into {model: {key: value}}."""
    if args.reads is None:
        args.reads = 300 if args.small else 60_000
    if args.hf_frames is None:
        args.hf_frames = 48 if args.small else 8000
    if args.check_rows is None:
        args.check_rows = 64 if args.small else 2000
    if args.fp32_rows is None:
        args.fp32_rows = 64 if args.small else 1000
    if args.interval is None:
        args.interval = 0.25 if args.small else 1.0
    args.model_params = {}
    for model, key, value in args.model_param:   # (model, key, value) from parse_model_param; last wins
        args.model_params.setdefault(model, {})[key] = value
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (writes e2e.json, e2e_tokens_per_gpu.png, logs) or a .json path")
    p.add_argument("--small", action="store_true",
                   help="demo-size models on CPU (server --cpu), a few hundred reads: the test's smoke run")
    p.add_argument("--reads", type=int, default=None, help="reads in the sample [60000; small 300]")
    p.add_argument("--chunk", type=int, choices=(300, 500), default=300, help="VirNucPro chunk length (bp)")
    p.add_argument("--seed", type=int, default=0, help="sample and weight seed")
    p.add_argument("--coding-fraction", type=float, default=0.6, help="reads cut from stop-free codon runs")
    p.add_argument("--coding-gc", type=float, default=0.56,
                   help="GC of the coding reads' codons (0.56: ~1.3 open frames per kept 300-bp chunk)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs the server may use (CUDA_VISIBLE_DEVICES=0..N-1); default: every visible GPU")
    p.add_argument("--one-gpu-json", "--baseline-json", dest="one_gpu_json", type=Path, default=None,
                   help="e2e.json of a one-GPU run (or perf/baseline.json filled from one): on several GPUs, "
                   "total frames/s is compared with its figures.e2e_frames_per_s")
    p.add_argument("--skip-baselines", action="store_true", help="no in-process / transformers runs")
    p.add_argument("--skip-dnabert-pass", action="store_true",
                   help="no DNABERT-S-alone client pass (its target then uses the mixed run's lower bound)")
    p.add_argument("--skip-esm2-pass", action="store_true",
                   help="no ESM-2-alone client pass, a shorter run (it sends the sample's frames again, about "
                   "as long as the mixed run); ESM-2's target then uses the mixed run's lower bound")
    p.add_argument("--dnabert-copies", type=positive_int, default=1, metavar="K",
                   help="the DNABERT-S-alone pass sends the sample's reads K times (ids suffixed), so that it "
                   "lasts long enough to time the steady state rather than its ramp (perf/README.md: how "
                   "long one copy lasts)")
    p.add_argument("--inprocess-frames", type=int, default=0,
                   help="frames for the in-process baseline (0: all; fewer if --budget-s requires)")
    p.add_argument("--hf-frames", type=int, default=None, help="frames for the transformers baseline [8000; small 48]")
    p.add_argument("--check-rows", type=int, default=None,
                   help="first rows whose embeddings are compared across paths (cosine) [2000; small 64]")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="whole-command time budget: the in-process baseline shrinks to fit it")
    p.add_argument("--esm-writer", choices=("fast", "core"), default="fast",
                   help="ESM-2 checkpoint: fast = bf16 safetensors (model dtype), core = embed_core's fp32 writer")
    p.add_argument("--startup-timeout", type=float, default=420.0, help="seconds for the server to load both models")
    p.add_argument("--interval", type=float, default=None, help="seconds between /metrics samples [1; small 0.25]")
    p.add_argument("--instances-per-gpu", type=instance_counts, default=None, metavar="N|MODEL=N,...",
                   help="model instances per GPU (instance_group count of the GPU configs): N for every model, "
                   "or per model, e.g. dnabert_s=3 (with --small: CPU instances, N only) "
                   "[default: as model_repository/ configures them]")
    p.add_argument("--model-param", action="append", default=[], type=parse_model_param, metavar="MODEL:KEY=VALUE",
                   help="set a config parameter of a model, repeatable (e.g. dnabert_s:attention=flex); the "
                   "in-process baseline takes the RuntimeConfig choices among them (attention, kernels, dtype) too")
    p.add_argument("--client-arg", action="append", default=[],
                   help="extra embed-client argument, repeatable (e.g. --client-arg=--max-in-flight=16)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch folder for the sample, checkpoints, repository, client output (default: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--fp8-plans", type=fp8_plans, default="auto", metavar="auto|none|PLAN[,PLAN]",
                   help="fp8 execution plans run through the server after the default plan (fp8, fp8-smooth, fp8-ffn): "
                   "auto = fp8 on a GPU with FP8 GEMMs (compute capability >= 8.9), none on a CPU or with --small")
    p.add_argument("--fp8-min-cosine", type=float, default=0.0,
                   help="the fp8 passes' config parameter fp8_min_cosine: the random weights here fall below "
                   "the gate's default 0.999, so the speed passes let them through and report the gate's figures")
    p.add_argument("--fp32-rows", type=int, default=None,
                   help="first frames per model embedded in fp32 for each plan's cosine per sequence [1000; small 64]")
    p.add_argument("--strict", action="store_true", help="exit 4 when a target FAILs")
    return p
