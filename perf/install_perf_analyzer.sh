#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer of the server's release (Triton 2.51) beside the project's Python,
# without touching the environment's own tritonclient:
#
#   bash perf/install_perf_analyzer.sh            # into <python prefix>/perf_analyzer (.venv/perf_analyzer)
#   bash perf/install_perf_analyzer.sh DIR        # into DIR (then export PERF_ANALYZER_HOME=DIR)
#   python perf/perf_analyzer.py --check          # then: where it is, and whether it can run
#   bash perf/install_perf_analyzer.sh --pack .dev/perf_analyzer.tar.xz
#                      # for the GPU machines (no registry there): binary, libcudart and libb64 in one
#                      # ~5 MB archive that perf/on-device.sh unpacks (libb64 always included)
#
# The manylinux wheel of tritonclient==2.51.0 ships the perf_analyzer binary (bin/perf_analyzer).
# It is installed with --target (no dependencies), so the project's tritonclient, protobuf and
# geventhttpclient stay as they are: pinning tritonclient[grpc,http]==2.51.0 in the perf extra
# would need protobuf<5 and geventhttpclient<=2.0.2, where the test env has protobuf 6 and locust
# needs geventhttpclient>=2.5.1. The binary links two libraries even on a CPU-only machine:
#   libcudart.so.12   from the wheel nvidia-cuda-runtime-cu12 (installed here, same --target)
#   libb64.so.0d      the Debian/Ubuntu package libb64-0d: used from the system where installed
#                     (`apt-get install -y libb64-0d`), else downloaded with `apt-get download`
#                     (no root needed) and unpacked into DIR/libb64.
# perf/perf_analyzer.py finds the binary and puts both library folders on LD_LIBRARY_PATH.
# Idempotent: a second run checks and returns. Exit 0 installed and runnable; 1 otherwise, saying why.
# PYTHON picks the interpreter whose pip installs the wheels (default: .venv/bin/python if present,
# else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
TRITONCLIENT_VERSION=2.51.0
CUDART_SPEC=nvidia-cuda-runtime-cu12==12.6.77   # CUDA 12.6: what Triton 2.51 (24.10) is built with
if [ -z "${PYTHON:-}" ]; then
    if [ -x "${VENV:-.venv}/bin/python" ]; then PYTHON=${VENV:-.venv}/bin/python; else PYTHON=python3; fi
fi
PACK=
if [ "${1:-}" = --pack ]; then
    PACK=$(realpath -m "${2:?--pack needs a file name}")
    TARGET=$(mktemp -d)/perf_analyzer
else
    TARGET=${1:-$("$PYTHON" -c 'import sys; print(sys.prefix)')/perf_analyzer}
fi
say() { echo "install_perf_analyzer: $*" >&2; }

if [ ! -x "$TARGET/bin/perf_analyzer" ] || [ ! -e "$TARGET/nvidia/cuda_runtime/lib/libcudart.so.12" ] \
        || ! grep -qx "$TRITONCLIENT_VERSION" "$TARGET/VERSION" 2>/dev/null; then
    say "tritonclient==$TRITONCLIENT_VERSION (manylinux: bin/perf_analyzer) and $CUDART_SPEC -> $TARGET"
    rm -rf "$TARGET"
    [ "$(uname -sm)" = "Linux x86_64" ] || say "$(uname -sm): the wheel's perf_analyzer is built for Linux x86-64 only"
    "$PYTHON" -m pip install -q --no-deps --only-binary=:all: --target "$TARGET" \
        "tritonclient==$TRITONCLIENT_VERSION" "$CUDART_SPEC"
    rm -f "$TARGET/bin/perf_client"   # the same binary under its old name
    echo "$TRITONCLIENT_VERSION" > "$TARGET/VERSION"
fi

if [ -z "$PACK" ] && ldconfig -p 2>/dev/null | grep 'libb64\.so\.0d' >/dev/null; then
    :   # the system's (apt-get install -y libb64-0d)
elif ls "$TARGET"/libb64/usr/lib/*/libb64.so.0d >/dev/null 2>&1; then
    :   # unpacked by an earlier run
elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
    say "libb64.so.0d: not on this system; apt-get download libb64-0d, unpacked into $TARGET/libb64"
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -q libb64-0d >/dev/null 2>&1) \
            || { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 \
                 && (cd "$tmp" && apt-get download -q libb64-0d >/dev/null 2>&1); }; then
        dpkg-deb -x "$tmp"/libb64-0d_*.deb "$TARGET/libb64"
    fi
    rm -rf "$tmp"
fi

if [ -n "$PACK" ]; then
    ls "$TARGET"/libb64/usr/lib/*/libb64.so.0d >/dev/null 2>&1 || { say "libb64-0d could not be downloaded"; exit 1; }
    PERF_ANALYZER_HOME="$TARGET" "$PYTHON" perf/perf_analyzer.py --check
    mkdir -p "$(dirname "$PACK")"
    say "packing $PACK (xz -9: ~40 s)"
    tar -C "$TARGET" -cf - VERSION bin/perf_analyzer nvidia/cuda_runtime/lib libb64/usr/lib | xz -9 -T0 > "$PACK"
    rm -rf "$(dirname "$TARGET")"
    say "$(du -h "$PACK" | cut -f1) $PACK: on the GPU machine perf/on-device.sh unpacks it into /tmp/perf_analyzer"
    exit 0
fi

# The verdict, from the wrapper that runs it (it prints the binary, the libraries and what is missing).
PERF_ANALYZER_HOME="$TARGET" exec "$PYTHON" perf/perf_analyzer.py --check
