# Sourced by perf/on-device.sh at the start of every run on the GPU machine, from the
# repo root, after perf/bundle/make-bundle.sh has built .dev/ (it copies this file into
# .dev/) and the run carries .dev:
#   source .dev/on-device.sh
# Afterwards:
#   $TRITONSERVER      the tritonserver 2.51 binary (from nvidia-pytriton 0.7.0)
#   $TRITON_BACKENDS   a backend directory holding the python backend + 3.12 stub
#   $STUB_PATH         put it first on PATH when starting tritonserver: the stub's
#                      Python then sees numpy 1.26 over the image's torch venv
#                      (docs/triton.md); python3 itself keeps numpy 2 for everything else
#   python3            also sees tritonclient
python3 -m venv --without-pip /tmp/stubenv || return 1
_sp=/tmp/stubenv/lib/python3.12/site-packages
python3 -c "import site;print(site.getsitepackages()[0])" > $_sp/image-venv.pth
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $_sp .dev/numpy-1.26.4-*.whl || return 1
export STUB_PATH=/tmp/stubenv/bin
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .dev/tritonclient-*.whl .dev/python_rapidjson-*.whl || return 1
mkdir -p /tmp/tr && tar xJf .dev/tritonserver.tar.xz -C /tmp/tr || return 1
mkdir -p /tmp/tr/backends/python
cp /tmp/tr/pytriton/tritonserver/backends/python/* /tmp/tr/backends/python/
cp /tmp/tr/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub /tmp/tr/backends/python/
chmod +x /tmp/tr/pytriton/tritonserver/bin/tritonserver /tmp/tr/backends/python/triton_python_backend_stub
export TRITONSERVER=/tmp/tr/pytriton/tritonserver/bin/tritonserver
export TRITON_BACKENDS=/tmp/tr/backends
export LD_LIBRARY_PATH=/tmp/tr/nvidia_pytriton.libs:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
