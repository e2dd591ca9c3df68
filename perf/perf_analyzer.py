"""Run NVIDIA's perf_analyzer (Triton 2.51's, from the tritonclient 2.51.0 manylinux wheel) with the two
libraries it links found: libcudart.so.12 (wheel nvidia-cuda-runtime-cu12) and libb64.so.0d (Debian
package libb64-0d), both needed even on a CPU-only machine.

    bash perf/install_perf_analyzer.sh                     # once: into <python prefix>/perf_analyzer
    python perf/perf_analyzer.py --check                   # where it is; exit 1 saying what is missing
    python perf/perf_analyzer.py -m esm2 -i grpc -u localhost:8001 --input-data perf/inputs/esm2_mixed.json ...

Every argument but --check goes to perf_analyzer unchanged. Where the binary is looked for, first
found wins: $PERF_ANALYZER (the binary), $PERF_ANALYZER_HOME (an install folder: perf/on-device.sh sets
it on the GPU machines, where it unpacks .dev/perf_analyzer.tar.xz), <this Python's prefix>/perf_analyzer,
<checkout>/.venv/perf_analyzer, then `perf_analyzer` on PATH (the NGC SDK image). An install folder holds
bin/perf_analyzer and the libraries beside it (nvidia/cuda_runtime/lib, libb64/usr/lib/<arch>, lib);
those folders and $PERF_ANALYZER_LIBS (colon-separated) go first on LD_LIBRARY_PATH. As a module:
`locate()`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
VERSION = "2.51.0"
NEEDED = ("libb64.so.0d", "libcudart.so.12")
HINTS = {
    "libb64.so.0d": "apt-get install -y libb64-0d (or rerun perf/install_perf_analyzer.sh where apt-get works: "
                    "it unpacks the package without root)",
    "libcudart.so.12": "bash perf/install_perf_analyzer.sh (the wheel nvidia-cuda-runtime-cu12)",
}


@dataclasses.dataclass
class PerfAnalyzer:
    """The binary (None when none was found), the environment to run it with, and why it cannot run."""

    binary: Optional[Path]
    env: dict
    missing: List[str]          # libraries the dynamic loader does not find, or ["perf_analyzer"]

    @property
    def ok(self) -> bool:
        return self.binary is not None and not self.missing

    def reason(self) -> str:
        """One line: why perf_analyzer cannot run here, and the fix ('' when it can)."""
        if self.binary is None:
            return ("perf_analyzer not found (install it: bash perf/install_perf_analyzer.sh, "
                    "or set PERF_ANALYZER to the binary)")
        return "; ".join(f"{self.binary} cannot load {lib}: {HINTS.get(lib, 'install it')}" for lib in self.missing)

    def command(self, args) -> list:
        return [str(self.binary), *map(str, args)]


def install_dirs() -> List[Path]:
    """Install folders (bin/perf_analyzer inside), in the order they are tried."""
    dirs = []
    if os.environ.get("PERF_ANALYZER_HOME"):
        dirs.append(Path(os.environ["PERF_ANALYZER_HOME"]))
    dirs += [Path(sys.prefix) / "perf_analyzer", ROOT / ".venv" / "perf_analyzer"]
    return dirs


def library_dirs(home: Path) -> List[Path]:
    """The library folders of an install folder that exist."""
    found = [home / "nvidia" / "cuda_runtime" / "lib", home / "lib"]
    found += sorted((home / "libb64").glob("usr/lib/*/")) + [home / "libb64" / "usr" / "lib"]
    return [d for d in found if d.is_dir()]


def find_binary() -> Optional[Path]:
    if os.environ.get("PERF_ANALYZER"):
        return Path(os.environ["PERF_ANALYZER"])
    for home in install_dirs():
        if (home / "bin" / "perf_analyzer").is_file():
            return home / "bin" / "perf_analyzer"
    which = shutil.which("perf_analyzer")
    return Path(which) if which else None


def missing_libraries(binary: Path, env: dict) -> List[str]:
    """Libraries `ldd` reports as not found (none where ldd itself is missing: the run will tell)."""
    if not shutil.which("ldd"):
        return []
    try:
        out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [m.group(1) for m in re.finditer(r"^\s*(\S+)\s+=>\s+not found", out, re.M)]


def locate() -> PerfAnalyzer:
    """Find perf_analyzer and the environment that lets it load its libraries."""
    env = dict(os.environ)
    binary = find_binary()
    if binary is None or not binary.is_file():
        return PerfAnalyzer(None, env, ["perf_analyzer"])
    libs = [d for d in os.environ.get("PERF_ANALYZER_LIBS", "").split(":") if d]
    libs += [str(d) for d in library_dirs(binary.resolve().parent.parent)]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join(libs)
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)   # wheels installed with --target lose the x bit at times
    return PerfAnalyzer(binary, env, missing_libraries(binary, env))


def version(pa: PerfAnalyzer) -> str:
    """perf_analyzer's own version line ('Perf Analyzer Version 2.51.0 (...)'), or ''."""
    try:
        out = subprocess.run(pa.command(["--version"]), env=pa.env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((line.strip() for line in (out.stdout + out.stderr).splitlines() if "Version" in line), "")


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pa = locate()
    if argv == ["--check"]:
        if not pa.ok:
            print(f"perf_analyzer: NOT runnable: {pa.reason()}", file=sys.stderr)
            return 1
        line = version(pa)
        print(f"perf_analyzer: {pa.binary} ({line or 'no version line: it did not run'})")
        if VERSION not in line:
            print(f"perf_analyzer: expected version {VERSION} (the server's release)", file=sys.stderr)
        return 0 if line else 1
    if not pa.ok:
        print(f"perf_analyzer: {pa.reason()}", file=sys.stderr)
        return 127
    os.execve(str(pa.binary), pa.command(argv), pa.env)
    return 127   # not reached


if __name__ == "__main__":
    raise SystemExit(main())
