#!/usr/bin/env bash
# Wheels for the GPU check's machine (no network there; its image has torch, transformers, accelerate, peft, ninja,
# py-cpuinfo, msgpack, einops, psutil, nvidia-ml-py but not deepspeed): run here, where pip reaches PyPI. Fills .whl/
# (ignored by git), which launch/gpu_check.sh installs from. The machine runs Python 3.12 on x86-64. Versions: those
# pip resolved here for deepspeed 0.19.8 (pydantic and pydantic-core must match each other exactly).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# deepspeed is an sdist: build its pure-Python wheel (ops are JIT-built with nvcc there)
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
ls -la .whl
