#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh: the packages fer_jax needs that the
# GPU machine's Python 3.12 lacks, into .whl/ (git-ignored). Run here, where
# pip reaches the registries; the folder travels with the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 \
  tensorboardX==2.6.5 portpicker==1.6.0 importlib_resources==7.1.0 \
  opencv-python-headless==4.14.0.94  # 62 MB: all 7 wheels are 66.6 of 67.1 MB (64 MiB) the run tool carries
ls .whl
