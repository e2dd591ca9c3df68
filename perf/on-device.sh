# Source at the start of every run on a GPU machine, from the repo root, with `.dev`
# carried (built by the GPU lender's make-bundle.sh, which is not part of this repository). After it:
#   python3        the image's Python (torch, transformers, numpy 2) + our packages
#   $STUB_PATH     put first on PATH for tritonserver: numpy 1.26 + torch + our packages
#   $TRITONSERVER, $TRITON_BACKENDS   the tritonserver 2.51 binary and backend dir
source .dev/on-device.sh || return 1
# Our packages, installed without network (setuptools is in the image).
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/ours . >/tmp/ours.log 2>&1 \
    || { cat /tmp/ours.log; return 1; }
# Extra client wheels carried in .dev (dnaio, pyarrow, ...) where present.
ls .dev/extra/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ours .dev/extra/*.whl
cp -r /tmp/ours/. /tmp/stubenv/lib/python3.12/site-packages/
export PYTHONPATH=/tmp/ours${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/ours/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, 'gpus', torch.cuda.device_count())"
# perf_analyzer 2.51 (perf/sweep_perf_analyzer.py) where .dev carries it: built here with
# `bash perf/install_perf_analyzer.sh --pack .dev/perf_analyzer.tar.xz` (binary, libcudart.so.12, libb64.so.0d).
# Not usable: said, and the rest of the run (e2e.py) goes on.
if [ -f .dev/perf_analyzer.tar.xz ]; then
    { mkdir -p /tmp/perf_analyzer && tar xJf .dev/perf_analyzer.tar.xz -C /tmp/perf_analyzer \
        && export PERF_ANALYZER_HOME=/tmp/perf_analyzer && python3 perf/perf_analyzer.py --check; } \
        || echo "on-device.sh: perf_analyzer from .dev/perf_analyzer.tar.xz is not usable (above)" >&2
fi
