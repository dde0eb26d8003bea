#!/usr/bin/env bash
# What a lent GPU should check, in two stages that each fit one 10-minute device call:
#   benchmarks/gpu_check.sh tests   the Triton kernels against the float64 reference (bf16/fp16/fp32, every row of
#                                   the config table, torch.compile fullgraph, CUDA-graph replay, bitwise determinism
#                                   of the ordered dq; a hang there shows as rc 124) and alongside them the demo
#                                   pipeline on CUDA with the triton backend (shorter training than the CPU default);
#                                   not yet timed with the v2 kernels;
#   benchmarks/gpu_check.sh bench   the whole default attention benchmark (sides 63 96 192 321 447, every contender,
#                                   flex's compile caches pre-warmed in parallel), then the slide encoder's
#                                   throughput, triton against portable, each alone on the GPU; not yet timed on a GPU
#                                   (the benchmark is cut at 460 s; its JSON and markdown keep every finished size);
#   benchmarks/gpu_check.sh model   the slide encoder at scale (patches/s, peak memory, MFU; forward and
#                                   forward+backward, eager and compiled, 36,864 and 103,041 patches; one training
#                                   step on 199,809 patches with activation checkpointing), then one LoRA finetune
#                                   step of the 7B-shaped Llama (benchmarks/llm_step.py); not yet timed on a GPU;
#   benchmarks/gpu_check.sh tune    regenerate the kernels' launch-config table for this card at the benchmark's
#                                   size buckets (benchmarks/tune_triton.py, 420 s budget) into
#                                   $OUT/triton_configs.json: commit it to kernels/ after checking it;
#   benchmarks/gpu_check.sh all     tests and bench, one after the other (more than one device call's worth).
# Results go to $OUT (default benchmarks/results/gpu). The device machine has torch and triton but no package
# registry, so the repo is installed without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
case "$STAGE" in tests|bench|model|tune|all) ;; *) echo "usage: $0 [tests|bench|model|tune|all]" >&2; exit 2;; esac
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$OUT/gpu_bench.log"
SECONDS=0

if [ "$STAGE" = tune ]; then
  cp kernels/triton_configs.json "$OUT/triton_configs.json"
  timeout 480 python3 -m benchmarks.tune_triton --budget-s 420 --sizes 16384 65536 262144 --out "$OUT/triton_configs.json" 2>&1 | tee -a "$OUT/tune.log"
  echo "tune: rc ${PIPESTATUS[0]} after ${SECONDS} s"
  exit 0
fi

if [ "$STAGE" = model ]; then
  timeout 330 python3 -m benchmarks.encoder_throughput --device cuda --whole-slide 447 --json "$OUT/encoder_scale.json" \
      2>&1 | tee -a "$OUT/model_scale.log"
  echo "encoder at scale: rc ${PIPESTATUS[0]} after ${SECONDS} s"
  timeout 200 python3 -m benchmarks.llm_step --device cuda --json "$OUT/llm7b_step.json" 2>&1 | tee -a "$OUT/model_scale.log"
  echo "7B LoRA step: rc ${PIPESTATUS[0]} after ${SECONDS} s"
  exit 0
fi

if [ "$STAGE" != bench ]; then
  timeout 220 python3 -m topopack.model.cli demo --device cuda --backend triton --side 192 --out /tmp/demo-gpu \
      --train-slides 300 --vqa-steps 600 > "$OUT/gpu_demo.log" 2>&1 &
  demo=$!
  timeout 420 python3 -m pytest -q -x -p no:cacheprovider --durations=8 tests/test_triton.py tests/test_triton_configs.py \
      2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15
  echo "triton tests: rc ${PIPESTATUS[0]} after ${SECONDS} s"
  wait $demo; echo "demo: rc $? after ${SECONDS} s"; tail -n 14 "$OUT/gpu_demo.log"
  cp /tmp/demo-gpu/eval.json "$OUT/gpu_demo_eval.json" 2>/dev/null
fi

if [ "$STAGE" != tests ]; then
  timeout 460 python3 -m benchmarks.attention --device cuda \
      --json "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.md" --plot "$OUT/gpu_bench.png" 2>&1 | tee -a "$OUT/gpu_bench.log"
  echo "benchmark: rc ${PIPESTATUS[0]} after ${SECONDS} s"
  timeout 60 python3 -m benchmarks.encoder_throughput --device cuda 2>&1 | tee -a "$OUT/gpu_bench.log"
  echo "encoder throughput: rc ${PIPESTATUS[0]} after ${SECONDS} s"
fi
