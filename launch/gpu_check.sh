#!/usr/bin/env bash
# The GPU check (issue 12): everything meft_ds wants to see on a real accelerator, in one command.
#
#   bash launch/gpu_check.sh            on a CUDA machine (263 s on one H200, builds included)
#   bash launch/gpu_check.sh --dry-run  on any machine (CI): the same steps on the CPU at tiny sizes
#
# 1. build: DeepSpeed's CPU Adam and meft_ds's CPU kernels, JIT-built side by side before anything needs them;
# 2. tests: the tests marked gpu (tests/test_gpu.py): the masked path in bf16 on the device against the CPU kernel in
#    fp32, training on the device in bf16 against the CPU in fp32 (plain, and with the device cache and
#    pre-retrieval on), distribution rehearsal's targets and loss on the device in bf16 against the CPU in fp32;
# 3. sanitizer: the same tests under PyTorch's CUDA sanitizer (TORCH_CUDA_SANITIZER=1), which fails on any stream race;
# 4. bench: launch/gpu_bench.py: a randomly initialised LLaMA-2-7B-shaped model in bf16, r = 8464, K = 64,
#    micro-batch 2 x 256, ZeRO-2: tokens/s against LoRA r = 16 and against no adapter, peak device memory,
#    host<->device bytes per step, the device's wait for the host per layer. Writes gpu_bench.json and gpu_bench.md
#    into $OUT (the table BENCHMARKS.md includes: copy it to docs/bench/gpu_check.md and run
#    python launch/bench.py --render).
#
# Every step runs, each under its own time limit, whatever the earlier ones did (a lent GPU's minutes are few: one
# call must tell all it can); each writes $OUT/<step>.log, and $OUT/summary.txt lists the steps' exit codes and times.
# The script exits non-zero if any step failed. GPU_CHECK_STEPS picks steps (e.g. "environment build bench");
# GPU_BENCH_ARGS adds arguments to launch/gpu_bench.py (e.g. "--profile": the host's top functions, cProfile).
#
# Packages the machine lacks (the lent H200 has torch, transformers, accelerate, peft, ninja, py-cpuinfo, but neither
# deepspeed nor network) are installed from wheels in .whl/ when that folder exists: bash launch/gpu_wheels.sh makes
# it on a machine with network access.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; fi
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ "$dry_run" = 0 ] && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the wheels in .whl/ failed"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # meft_ds from this checkout, also for launch/gpu_bench.py
if [ "$dry_run" = 1 ]; then export DS_ACCELERATOR=cpu; else export DS_ACCELERATOR=cuda; fi
read -ra bench_args <<< "${GPU_BENCH_ARGS:-}"
if [ "$dry_run" = 1 ]; then bench_args+=(--dry-run); fi

started=$SECONDS
failed=0
: > "$OUT/summary.txt"
# step NAME LIMIT_SECONDS COMMAND...: run COMMAND under a time limit, its output into $OUT/NAME.log, and its exit code
# and seconds into $OUT/summary.txt
steps=" ${GPU_CHECK_STEPS:-environment build tests sanitizer bench} "
step() {
    local name=$1 limit=$2 begun=$SECONDS rc
    shift 2
    if [[ "$steps" != *" $name "* ]]; then return; fi
    echo "== gpu_check: $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then failed=1; fi
    echo "$name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)'), $((SECONDS - begun)) s" | tee -a "$OUT/summary.txt"
}

step environment 60 python3 -c "
import cpuinfo, deepspeed, torch, transformers
from deepspeed.accelerator import get_accelerator
accelerator = get_accelerator()
print('accelerator', accelerator.device_name(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
print('cpu', cpuinfo.get_cpu_info()['brand_raw'], torch.get_num_threads(), 'threads')
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__,
      'transformers', transformers.__version__)"
step build 300 bash -c '
python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" & adam=$!
python3 -c "from meft_ds.ops import cpu_kernels; cpu_kernels()"; kernels=$?
wait $adam && exit $kernels'
step tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
if [ "$dry_run" = 0 ]; then
    step sanitizer 240 env TORCH_CUDA_SANITIZER=1 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
fi
step bench 420 python3 launch/gpu_bench.py "${bench_args[@]}" --out "$OUT"
cat "$OUT/summary.txt"
echo "gpu_check: done in $((SECONDS - started)) s; results in $OUT"
exit $failed
