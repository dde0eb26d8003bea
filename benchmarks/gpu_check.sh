#!/usr/bin/env bash
# Everything a lent GPU should check, in one run (about 8 minutes on one H100):
#   1. the Triton kernels against the float64 reference in bf16/fp16/fp32, and torch.compile(fullgraph=True);
#   2. the attention benchmark (sides 63 192 321 447, bf16), results into $OUT or benchmarks/results;
#   3. the slide encoder's throughput, triton against portable.
# The device machine has torch and triton but no package registry: install the repo without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
TOPOPACK_TRITON_AUTOTUNE=0 timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 420 python3 -m benchmarks.attention --device cuda --results 2>&1 | tee "$OUT/gpu_bench.log"
timeout 120 python3 -m benchmarks.encoder_throughput --device cuda 2>&1 | tee -a "$OUT/gpu_bench.log"
