"""perf/e2e.py's first phase: preflight (every module each process needs, named at once), the
environments of the client and server subprocesses, the device and the run's recorded config."""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from e2e_common import MODELS, ROOT, Failure, Scenario, load_perf_module, log
from e2e_options import inprocess_overrides, model_params_problem, model_params_text

CLIENT_REQUIRED = ("numpy", "dnaio", "xopen", "pyarrow", "grpc", "tritonclient.grpc.aio")
CLIENT_OPTIONAL = ("rich", "prometheus_client")      # live view / client-side progress rates only
PARENT_REQUIRED = ("numpy", "torch", "tokenizers", "safetensors", "embed_core", "embed_client", "embed_server")
STUB_CODE = ("import sys, numpy, torch, tokenizers, safetensors, embed_core, embed_server\n"
             "print(sys.version_info[0], sys.version_info[1], numpy.__version__, torch.__version__)")


def missing_modules(names) -> List[str]:
    out = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken install
            out.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    return out


def ensure_packages_importable() -> Optional[str]:
    """Our packages for this process and the client subprocess: installed, or this checkout's folders.

    Returns a directory to put on the subprocesses' PYTHONPATH (symlinks embed_* -> folders), or None.
    """
    if all(importlib.util.find_spec(p) is not None for p in ("embed_core", "embed_client", "embed_server")):
        return None
    links = Path(tempfile.mkdtemp(prefix="e2e-pkgs-"))
    for name, folder in (("embed_core", "core"), ("embed_client", "client"), ("embed_server", "server")):
        os.symlink(ROOT / folder, links / name)
    sys.path.insert(0, str(links))
    return str(links)


def stub_python() -> str:
    """The python3 the server (and so the Python backend stub) runs with: $STUB_PATH's, else ours."""
    stub = os.environ.get("STUB_PATH")
    if stub:
        candidate = Path(stub) / "python3"
        if candidate.exists():
            return str(candidate)
    return sys.executable


def child_env(extra_path: Optional[str]) -> dict:
    """os.environ with `extra_path` (from ensure_packages_importable) first on PYTHONPATH."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def server_env(extra_path: Optional[str], gpus: Optional[int]) -> dict:
    """child_env, plus $STUB_PATH first on PATH (the stub finds its packages through PATH, not
    PYTHONPATH: docs/triton.md) and the GPUs the server may use."""
    env = child_env(extra_path)
    if os.environ.get("STUB_PATH"):
        env["PATH"] = os.environ["STUB_PATH"] + os.pathsep + env.get("PATH", "")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    return env


def preflight(args, extra_path: Optional[str]) -> dict:
    """Every module each part needs; raises Failure naming all that are missing (exit 3)."""
    problems = []
    parent = list(PARENT_REQUIRED)
    if not args.skip_baselines:
        parent.append("transformers")
    for part, names in (("client (python3)", CLIENT_REQUIRED), ("scenario (python3)", parent)):
        missing = missing_modules(names)
        if missing:
            problems.append(f"{part} is missing: " + ", ".join(missing))
    optional = [n for n in CLIENT_OPTIONAL if importlib.util.find_spec(n) is None]
    if importlib.util.find_spec("matplotlib") is None:
        optional.append("matplotlib (the PNG is drawn without text instead)")
    python = stub_python()
    env = server_env(extra_path, None)
    stub = subprocess.run([python, "-c", STUB_CODE], capture_output=True, text=True, env=env)
    stub_info = stub.stdout.split()
    if stub.returncode != 0:
        last = (stub.stderr.strip().splitlines() or ["?"])[-1]
        problems.append(f"server stub python {python} cannot import its modules: {last}")
    elif int(stub_info[2].split(".")[0]) >= 2:
        problems.append(f"server stub python {python} has numpy {stub_info[2]}; tritonserver 2.51 needs numpy<2 "
                        "(set STUB_PATH, see perf/on-device.sh)")
    if problems:
        raise Failure("preflight:\n  " + "\n  ".join(problems))
    import numpy
    import torch
    info = {"python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
            "stub_python": python, "stub_numpy": stub_info[2], "stub_torch": stub_info[3],
            "optional_missing": optional}
    bm = load_perf_module("bench_models")
    for name in ("transformers", "pyarrow", "tritonclient"):
        info[name] = bm.package_version(name)
    return info


def refuse(s: Scenario, status: str, note: str, code: int, label: str = "") -> int:
    """Ends the run before anything slow started: the reason on stderr and in e2e.json."""
    print(f"e2e: {label}{note}", file=sys.stderr, flush=True)
    s.report["status"] = status
    s.report["notes"].append(note)
    s.save()
    return code


def check_before_start(s: Scenario) -> int:
    """Preflight (exit 3) and --model-param (exit 2), before the sample, checkpoints or server; 0 when
    the run can go on."""
    s.extra_path = ensure_packages_importable()
    try:
        s.report["config"]["software"] = preflight(s.args, s.extra_path)
    except Failure as e:
        return refuse(s, "preflight failed", str(e), 3)
    problem = model_params_problem(s.args.model_params)
    if problem:
        return refuse(s, "usage error", problem, 2, label="usage: ")
    return 0


def logging_quiet() -> None:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)


def open_device(s: Scenario) -> None:
    """The scratch folder, the device (GPU 0, or the CPU with --small or without CUDA), the model
    sizes, and the run's config in the report, logged."""
    import torch
    from e2e_checkpoints import model_dims
    args = s.args
    s.workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="e2e-"))
    s.workdir.mkdir(parents=True, exist_ok=True)
    logging_quiet()
    s.device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda:0")
    if s.device.type == "cuda":
        torch.cuda.set_device(s.device)
    device_name = (torch.cuda.get_device_name(s.device) if s.device.type == "cuda"
                   else (platform.processor() or "cpu"))
    s.dims = model_dims(args.small)
    config = s.report["config"]
    config.update({
        "device": device_name, "small": args.small, "gpus_visible": torch.cuda.device_count(),
        "gpus_requested": args.gpus, "dims": s.dims, "esm_writer": args.esm_writer,
        "client_args": list(args.client_arg), "workdir": str(s.workdir),
        "instances_per_gpu": args.instances_per_gpu, "model_params": args.model_params, "instances": {},
        "inprocess_overrides": {m: inprocess_overrides(args.model_params.get(m, {})) for m in MODELS},
        "models_desc": "demo-size models (CPU)" if args.small else "ESM-2 3B + DNABERT-S real size, random weights"})
    for m, params in sorted(args.model_params.items()):
        server_only = sorted(set(params) - set(config["inprocess_overrides"][m]))
        if server_only and not args.skip_baselines:
            s.report["notes"].append(f"{m}: {', '.join(server_only)} set on the server only; the in-process "
                                     "baseline keeps its defaults there")
    sw = config["software"]
    log(f"server: instances per GPU {args.instances_per_gpu or 'as configured'}; config parameters: "
        f"{model_params_text(args.model_params)}")
    log(f"{device_name + ' x' + str(torch.cuda.device_count()) if s.device.type == 'cuda' else 'CPU'}; python "
        f"{sw['python']} torch {sw['torch']} numpy {sw['numpy']}; stub numpy {sw['stub_numpy']}; transformers "
        f"{sw['transformers']}; pyarrow {sw['pyarrow']}; tritonclient {sw['tritonclient']}"
        + (f"; optional missing: {', '.join(sw['optional_missing'])}" if sw["optional_missing"] else ""))
