#!/bin/bash
# Builds .dev/ in the current repo root: what a lent H200 GPU machine (no package
# registry there) lacks to run the Triton server and its Python client. Run it on a
# machine with network, from the project's root: bash perf/bundle/make-bundle.sh; then
# carry .dev with every GPU run and begin it with `source perf/on-device.sh`.
#   .dev/tritonserver.tar.xz  tritonserver 2.51 + python backend (stub for
#                             Python 3.12) + its libraries, from nvidia-pytriton
#   .dev/*.whl                tritonclient, python-rapidjson, numpy 1.26 (cp312)
#   .dev/on-device.sh         the environment for it; perf/on-device.sh sources it
set -euo pipefail
mkdir -p .dev
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" nvidia-pytriton==0.7.0
(cd "$tmp" && python3 -m zipfile -e nvidia_pytriton-*.whl x && chmod +x x/pytriton/tritonserver/bin/tritonserver x/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub)
(cd "$tmp/x" && tar cJf - --exclude='libpython3-*' \
    pytriton/tritonserver/bin pytriton/tritonserver/caches \
    pytriton/tritonserver/backends/python/libtriton_python.so \
    pytriton/tritonserver/backends/python/triton_python_backend_utils.py \
    pytriton/tritonserver/python_backend_stubs/3.12 nvidia_pytriton.libs) > .dev/tritonserver.tar.xz
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .dev \
    tritonclient==2.73.0 python-rapidjson==1.25 numpy==1.26.4
rm -rf "$tmp"
cp "$(dirname "$0")/on-device.sh" .dev/   # perf/on-device.sh sources it from .dev
ls -la .dev
