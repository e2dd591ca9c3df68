#!/usr/bin/env bash
# One entry point for a fresh clone (needs only Python >= 3.9 and pip):
#   ./dev.sh demo    set up .venv, start the embedded Triton server on demo models,
#                    embed the bundled sample FASTA, print where the embeddings are
#   ./dev.sh test    set up .venv and run the whole test suite (what CI runs)
#   ./dev.sh setup   only set up .venv
# PYTHON picks the interpreter (default python3); TORCH_SPEC the torch requirement
# (default torch==2.13.0: a CPU build where a local wheel exists, else PyPI's).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    python -m pip install -q --upgrade pip
    python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
    # numpy<2: the Triton 2.51 Python backend breaks under numpy 2 (see README).
    python -m pip install -q -e ".[test]" "numpy<2"
    # NVIDIA's perf_analyzer 2.51 into $VENV/perf_analyzer (tests/perf/test_perf_analyzer.py; SKIP_PERF_ANALYZER=1: not)
    [ "${SKIP_PERF_ANALYZER:-0}" = 1 ] || PYTHON=python bash perf/install_perf_analyzer.sh \
        || echo "dev.sh: perf_analyzer not installed (above: why); its tests skip, saying so" >&2
}

case "${1:-}" in
    setup) setup ;;
    demo)  setup; shift; exec python -m embed_server.demo "$@" ;;
    test)  setup; shift; exec python -m pytest "$@" ;;
    *) echo "usage: ./dev.sh demo|test|setup [args]" >&2; exit 2 ;;
esac
