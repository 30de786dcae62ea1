#!/usr/bin/env bash
# One accelerator session (a lent H100/H200, ~10 min): the two GPU jobs of issues 11 and 13.
#   1. pretrain the tiny base (the embedded default's SD 1.5) with a time box of BASE_MINUTES;
#      base.json in the returned bundle records the step count it fitted, so
#      `--set train.steps=<steps> --set train.max_minutes=0` redoes it exactly;
#   2. the Ray GPU generation path on an SD 1.5-shaped model (benchmarks/generate.py --gpu):
#      bf16, batch 16, 50 DDIM steps, 512 px; eager at λ = 1 and 0.5, then compiled at λ = 1.
# The SD 1.5-shaped model is built on the CPUs while the base trains on the GPU.
# Needs .whl/ (bash ../shared/tools/device-wheels.sh); results land in $OUT:
#   device run: carry [".whl"], command "bash tools/device_session.sh", timeout_s 600
set -u
SECONDS=0
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0
OUT=${OUT:-runs/device}; mkdir -p "$OUT"
BASE_MINUTES=${BASE_MINUTES:-3.5}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" >> "$OUT/gpu.txt" 2>&1

GEN="python3 benchmarks/generate.py --gpu --dtype bfloat16 --batch-size 16 --sources 32 --repeats 1 --model-dir /tmp/sd15"
(OMP_NUM_THREADS=12 $GEN --build-only > "$OUT/build.log" 2>&1) &
build=$!

timeout 330 python3 -m jobs.pretrain_base --no-progress --set out=/tmp/base --set train.device=cuda \
  --set train.max_minutes="$BASE_MINUTES" --set train.steps=200000 --set train.batch_size=256 \
  --set train.warmup_steps=200 --set train.cooldown_steps=2000 --set train.save_every=2000 \
  --set train.log_every=50 --set corpus.num_images=100000 --set corpus.workers=14 > "$OUT/base.log" 2>&1
echo "base: rc $? after $SECONDS s" >> "$OUT/gpu.txt"
tar czf "$OUT/base.tgz" -C /tmp/base final loss.jsonl config.yaml samples.png loss.png 2>> "$OUT/gpu.txt"

wait $build; echo "sd15 build: rc $? at $SECONDS s" >> "$OUT/gpu.txt"
timeout 150 $GEN --lambdas 1.0 0.5 --json "$OUT/gen.json" > "$OUT/gen.log" 2>&1
echo "eager bench: rc $? at $SECONDS s" >> "$OUT/gpu.txt"
left=$((560 - SECONDS))
[ "$left" -gt 60 ] && timeout "$left" $GEN --lambdas 1.0 --compile --json "$OUT/gen_compiled.json" > "$OUT/gen_compiled.log" 2>&1
echo "compiled bench: rc $? at $SECONDS s" >> "$OUT/gpu.txt"
