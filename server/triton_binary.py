"""Finding the tritonserver binary and what its Python backend needs that the nvidia-pytriton
wheel leaves to us (a backend directory with a stub for this Python, the wheel's libraries, this
environment's python3 with numpy<2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .server_options import LaunchError


def pytriton_dist() -> Optional[Path]:
    """`pytriton/tritonserver` of the installed nvidia-pytriton wheel, or None."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return dist if (dist / "bin" / "tritonserver").exists() else None


def find_tritonserver(explicit: Optional[Path] = None) -> Path:
    """The tritonserver binary: the argument, $TRITONSERVER, PATH, then nvidia-pytriton."""
    tried = []
    for label, candidate in (
        ("--tritonserver", explicit),
        ("$TRITONSERVER", os.environ.get("TRITONSERVER")),
    ):
        if candidate:
            path = Path(candidate)
            if path.is_file() and os.access(path, os.X_OK):
                return path.resolve()
            raise LaunchError(f"{label} {path} is not an executable file")
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path).resolve()
    tried.append("PATH")
    dist = pytriton_dist()
    if dist is not None:
        return dist / "bin" / "tritonserver"
    tried.append("the nvidia-pytriton package")
    raise LaunchError(
        "tritonserver not found (looked at --tritonserver, $TRITONSERVER, "
        + ", ".join(tried)
        + "); install it with `pip install 'virnuc-embed[server]'` (nvidia-pytriton==0.7.0)"
    )


def stub_python_version() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def assemble_backends(binary: Path, out_dir: Path) -> Path:
    """A backend directory whose `python/` holds the backend and a stub for this Python.

    A tritonserver install (e.g. /opt/tritonserver in the NGC image) already has
    `backends/python/triton_python_backend_stub`: use it as it is. The nvidia-pytriton
    wheel keeps one stub per Python under `python_backend_stubs/<X.Y>/`: copy the backend
    files and the matching stub into `out_dir/python`.
    """
    root = binary.parent.parent
    backend = root / "backends" / "python"
    if not (backend / "libtriton_python.so").exists():
        raise LaunchError(f"no Python backend at {backend} (beside {binary})")
    if (backend / "triton_python_backend_stub").exists():
        return backend.parent
    version = stub_python_version()
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        have = sorted(p.name for p in (root / "python_backend_stubs").glob("*"))
        raise LaunchError(
            f"no Python backend stub for Python {version} under {root / 'python_backend_stubs'} "
            f"(have: {', '.join(have) or 'none'}); run embed-server with one of those Pythons"
        )
    target = out_dir / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in backend.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    shutil.copy2(stub, target / stub.name)
    os.chmod(target / stub.name, 0o755)  # wheels extracted by zipfile lose the run bit
    return out_dir


SECRET_ENV = ("EMBED_ADMIN_KEY", "EMBED_API_KEY", "EMBED_ADMIN_KEY_FILE", "EMBED_API_KEY_FILE")


def server_env(binary: Path) -> dict:
    """The child's environment: bundled libraries and this environment's bin first on PATH."""
    env = dict(os.environ)
    libs = [binary.parent.parent.parent.parent / "nvidia_pytriton.libs"]  # beside pytriton/
    libs = [str(p) for p in libs if p.is_dir()]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join(libs)
    # Not resolved: a venv's bin/python is a symlink to the base interpreter, and the
    # stub must find the venv's python3 (and with it the venv's site-packages).
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    for name in SECRET_ENV:  # the keys stay with embed-server
        env.pop(name, None)
    return env


def gpu_visible() -> bool:
    """True when a CUDA GPU is visible, judged without importing torch."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            return out.returncode == 0 and "GPU " in out.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    return any(Path("/dev").glob("nvidia[0-9]*"))


def check_stub_python(env: dict) -> None:
    """The stub's `python3` must match the stub's version and have numpy < 2.

    The 2.51 Python backend returns EMPTY output tensors and crashes on TYPE_STRING inputs
    under numpy 2, so we refuse to start rather than serve wrong answers.
    """
    python3 = shutil.which("python3", path=env["PATH"])
    if python3 is None:
        raise LaunchError("no python3 on PATH for the Python backend stub")
    code = (
        "import sys, importlib.metadata as m\n"
        "try: v = m.version('numpy')\n"
        "except m.PackageNotFoundError: v = ''\n"
        "print(f'{sys.version_info[0]}.{sys.version_info[1]} {v}')"
    )
    out = subprocess.run([python3, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise LaunchError(f"{python3} failed: {out.stderr.strip()}")
    version, _, numpy_version = out.stdout.strip().partition(" ")
    if not numpy_version:
        raise LaunchError(f"numpy is not installed for {python3}, which the backend stub uses")
    if int(numpy_version.split(".")[0]) >= 2:
        raise LaunchError(
            f"numpy {numpy_version} is installed for {python3}; the Python backend of "
            "tritonserver 2.51 needs numpy<2 (under numpy 2 it returns empty outputs and "
            "crashes on string inputs). Run: pip install 'numpy<2'"
        )
    if version != stub_python_version():
        raise LaunchError(
            f"{python3} is Python {version} but the backend stub is for Python "
            f"{stub_python_version()}; run embed-server with the environment's own Python"
        )
