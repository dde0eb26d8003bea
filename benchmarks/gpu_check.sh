#!/usr/bin/env bash
# Everything a lent GPU should check, in one run of about 8 minutes on one H100:
#   1. the Triton kernels against the float64 reference (bf16/fp16/fp32, torch.compile fullgraph), and alongside
#      them the demo pipeline on CUDA with the triton backend (shorter training than the CPU default);
#   2. the attention benchmark at sides 321 and 192 (bf16), alone on the GPU (flex's variants are left out: each
#      compiles for over a minute with fresh caches);
#   3. the slide encoder's throughput, triton against portable, alone on the GPU.
# Results go to $OUT (default benchmarks/results/gpu). The device machine has torch and triton but no package
# registry, so the repo is installed without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu_bench.log"

SECONDS=0
timeout 220 python3 -m topopack.model.cli demo --device cuda --backend triton --side 192 --out /tmp/demo-gpu \
    --train-slides 300 --vqa-steps 600 > "$OUT/gpu_demo.log" 2>&1 &
demo=$!
TOPOPACK_TRITON_AUTOTUNE=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider --durations=8 tests/test_triton.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15
echo "triton tests: rc ${PIPESTATUS[0]} after ${SECONDS} s"
wait $demo; echo "demo: rc $? after ${SECONDS} s"; tail -n 14 "$OUT/gpu_demo.log"
cp /tmp/demo-gpu/eval.json "$OUT/gpu_demo_eval.json" 2>/dev/null

timeout 240 python3 -m benchmarks.attention --device cuda --sizes 321 192 \
    --impls topopack-triton topopack-portable dense authors flex floor \
    --json "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.md" --plot "$OUT/gpu_bench.png" 2>&1 | tee -a "$OUT/gpu_bench.log"
echo "benchmark: rc ${PIPESTATUS[0]} after ${SECONDS} s"
timeout 60 python3 -m benchmarks.encoder_throughput --device cuda 2>&1 | tee -a "$OUT/gpu_bench.log"
echo "encoder throughput: rc ${PIPESTATUS[0]} after ${SECONDS} s"
