#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100/H200 with no network:
#   1. fer_jax's train step, then torchvision's (torch.compile and eager,
#      channels_last), ResNet18 and EfficientNet-B0, 224 px, batch 256,
#      bfloat16 and float32;
#   2. if time is left: the Grain pipeline at 224 px feeding the step, and
#      EfficientNet with the other kernels (model.kernels='cpu').
# The table of JAX / PyTorch ratios is printed last. Results go to $OUT (or
# runs/gpu_check).
#
# The machine's Python needs jax, flax, optax, orbax-checkpoint, torch and
# torchvision; what it lacks travels as wheels in .whl/ (git-ignored), made
# here with: bash benchmarks/gpu_wheels.sh
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke  # here: tiny sizes, CPU, ~3 min
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--cpu-smoke" ]; then
  SIZE=32; BATCH=8; STEPS=2; PIPE_TRAIN=160; WORKERS=2; BUDGET=600
  export CUDA_VISIBLE_DEVICES='' JAX_PLATFORMS=cpu
  TORCH_DEVICE=(--device cpu)
else
  SIZE=224; BATCH=256; STEPS=20; PIPE_TRAIN=4096; WORKERS=8; BUDGET=300
  TORCH_DEVICE=()
fi

if [ -z "${JAX_PLATFORMS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/fer_jax_site .whl/*.whl \
    || for w in .whl/*.whl; do unzip -qo "$w" -d /tmp/fer_jax_site; done
  export PYTHONPATH=/tmp/fer_jax_site
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  2>/dev/null || echo "no nvidia-smi"
"$PYTHON" - <<'EOF' || exit 1
import flax, jax, optax, platform, torch, torchvision
print(f'python {platform.python_version()} jax {jax.__version__} '
      f'flax {flax.__version__} optax {optax.__version__} torch '
      f'{torch.__version__} torchvision {torchvision.__version__}')
print('jax devices:', jax.devices())
EOF

# 1. Each framework in one process for all rows (imports and CUDA start
#    once; the first run, one process per row, took over 8 minutes):
#    bfloat16 before float32, each row written as soon as it is measured.
timeout 240 "$PYTHON" main.py --config=configs/benchmark.py --mode=benchmark \
  --workdir="$OUT/jax" \
  "--config.benchmark.models=('resnet18', 'efficientnet_b0')" \
  "--config.benchmark.dtypes=('bfloat16', 'float32')" \
  --config.benchmark.image_sizes="$SIZE" --config.benchmark.batch_sizes="$BATCH" \
  --config.benchmark.steps="$STEPS" --config.benchmark.pipeline=False \
  2>&1 | grep -v '^[IW][0-9]'
timeout 300 "$PYTHON" -m benchmarks.torch_reference \
  --models resnet18 efficientnet_b0 --dtypes bfloat16 float32 \
  --modes compile eager --image_sizes "$SIZE" --batch_sizes "$BATCH" \
  --steps "$STEPS" "${TORCH_DEVICE[@]}" --json "$OUT/torch.json"

# 2. Extras while the time budget lasts.
if (( SECONDS - START < BUDGET )); then
  timeout 90 "$PYTHON" main.py --config=configs/benchmark.py --mode=benchmark \
    --workdir="$OUT/pipeline" --config.benchmark.models=resnet18 \
    --config.benchmark.dtypes=bfloat16 \
    --config.benchmark.image_sizes="$SIZE" \
    --config.benchmark.batch_sizes="$BATCH" \
    --config.benchmark.steps="$STEPS" --config.benchmark.pipeline_batches=8 \
    --config.benchmark.warmup_steps=2 \
    --config.data.synthetic.num_train="$PIPE_TRAIN" \
    --config.data.synthetic.cache_dir=/tmp/fer_jax_data \
    --config.data.num_workers="$WORKERS" --config.data.num_threads=2 \
    2>&1 | grep -v '^[IW][0-9]' | tail -3
fi

if (( SECONDS - START < BUDGET + 60 )); then
  timeout 90 "$PYTHON" main.py --config=configs/benchmark.py --mode=benchmark \
    --workdir="$OUT/kernels_cpu" \
    --config.benchmark.models=efficientnet_b0 \
    --config.benchmark.dtypes=bfloat16 --config.model.kernels=cpu \
    --config.benchmark.image_sizes="$SIZE" \
    --config.benchmark.batch_sizes="$BATCH" \
    --config.benchmark.steps="$STEPS" --config.benchmark.pipeline=False \
    2>&1 | grep -v '^[IW][0-9]' | tail -3
fi
echo "gpu_check: $((SECONDS - START)) s"
"$PYTHON" benchmarks/compare.py --pair "$OUT/jax/benchmark.json" \
  "$OUT/torch.json" --out "$OUT"
