#!/usr/bin/env bash
# The GPU check (issue 12): everything meft_ds wants to see on a real accelerator, in one command.
#
#   bash launch/gpu_check.sh            on a CUDA machine: about 8 minutes on one H200
#   bash launch/gpu_check.sh --dry-run  on any machine (CI): the same steps on the CPU at tiny sizes
#
# 1. the tests marked gpu (tests/test_gpu.py): the masked path in bf16 on the device against the CPU kernel in fp32,
#    training on the device in bf16 against the CPU in fp32 (plain, and with the device cache and pre-retrieval on);
# 2. the same tests under PyTorch's CUDA sanitizer (TORCH_CUDA_SANITIZER=1), which fails on any stream race;
# 3. launch/gpu_bench.py: a randomly initialised LLaMA-2-7B-shaped model in bf16, r = 8464, K = 64, micro-batch
#    2 x 256, ZeRO-2: tokens/s against LoRA r = 16 and against no adapter, peak device memory, host<->device bytes per
#    step, the device's wait for the host per layer. Writes gpu_bench.json and gpu_bench.md into $OUT (the table
#    BENCHMARKS.md includes: copy it to docs/bench/gpu_check.md and run python launch/bench.py --render).
#
# Packages the machine lacks (the lent H200 has torch, transformers, accelerate, peft, ninja, py-cpuinfo, but neither
# deepspeed nor network) are installed from wheels in .whl/ when that folder exists: bash launch/gpu_wheels.sh makes
# it on a machine with network access.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; fi
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "$dry_run" = 0 ] && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import meft_ds" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

started=$SECONDS
if [ "$dry_run" = 1 ]; then
    export DS_ACCELERATOR=cpu
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.log"
    python3 launch/gpu_bench.py --dry-run --out "$OUT" 2>&1 | tee "$OUT/bench.log"
else
    export DS_ACCELERATOR=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.log"
    TORCH_CUDA_SANITIZER=1 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 \
        | tee "$OUT/sanitizer.log"
    python3 launch/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi
echo "gpu_check: done in $((SECONDS - started)) s; results in $OUT"
