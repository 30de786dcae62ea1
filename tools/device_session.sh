#!/usr/bin/env bash
# One accelerator session (a lent H100/H200, one call of <= 10 min): the GPU jobs of issues 11 and 13.
# JOBS picks them, in this order (one call holds either one comfortably, not both):
#   bench  the Ray GPU generation path on an SD 1.5-shaped model (benchmarks/generate.py --gpu): bf16,
#          batch 16, 50 DDIM steps, 512 px, 96 sources (3 shards), one actor with 4 CPUs (3 PNG encoders),
#          compiled at λ = 1, the paced stand-in (--stub) on this machine's CPUs, then eager at λ = 0.5
#          if time is left.
#          Compiling at load (UNet, ControlNet, VAE) took ~140 s a process on an H100.
#   base   pretrain a candidate base (the embedded default's SD 1.5) with a time box of BASE_MINUTES
#          (base.json records the step count it fitted: `--set train.steps=<steps> --set
#          train.max_minutes=0` redoes it), then the headline sweep's ControlNet, cells, FID and
#          judge on it (seg runs stay on the CPUs; the ControlNet's weights stay there: > 16 MiB).
#   solvers  the bench with a fast solver (SOLVER, SOLVER_STEPS; default dpmsolver++ 20): issue 25's >= 7 images/s.
#   draw   one labelled draw of the pre-registered headline (issue 23; DRAW=<seed>, default 3) with the
#          same config as on the CPUs (device keys are run-only: the identities and the record's
#          fingerprints are the same): ControlNet and generation on the GPU, the 14 seg runs four at
#          a time on quarters of it (seg_gpus_per_run 0.25, 3 CPUs each). Resumes in a second call
#          while the machine is warm. The run record and headline.json come back in $OUT: add the
#          record's entries to ours (python -m experiments.run_record $OUT/headline-runs.json) and
#          commit it; its entries name the commit from SCRIBBLEGEN_COMMIT (the copied tree has no
#          .git, so uncommitted changes cannot show as +dirty: run it from a clean commit).
#          sampler.dtype auto samples in float16 on CUDA (float32 on CPU): the same config and
#          fingerprints, other arithmetic; say which draws were made where.
# Needs .whl/ (bash ../shared/tools/device-wheels.sh); results land in $OUT:
#   device run: carry [".whl"], command "JOBS=bench bash tools/device_session.sh", timeout_s 600
#   device run: carry [".whl"], command "JOBS=solvers SOLVER_STEPS=20 bash tools/device_session.sh", timeout_s 600
#   device run: carry [".whl"], command "SCRIBBLEGEN_COMMIT=<sha> JOBS=draw DRAW=3 bash tools/device_session.sh"
set -u
SECONDS=0
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0
OUT=${OUT:-runs/device}; mkdir -p "$OUT"
LOGS=/tmp/logs; mkdir -p "$LOGS"
JOBS=${JOBS:-bench}
BASE_MINUTES=${BASE_MINUTES:-2.5}
BASE_CHANNELS=${BASE_CHANNELS:-[64,96,128]}
END=${END:-585}   # the script's own deadline, inside the call's 600 s
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" >> "$OUT/gpu.txt" 2>&1
log() { echo "$1: rc $2 at $SECONDS s" >> "$OUT/gpu.txt"; }

bench() {
  local gen="python3 benchmarks/generate.py --gpu --dtype bfloat16 --batch-size 16 --sources 96 --repeats 1 --model-dir /tmp/sd15 --sources-dir /tmp/src96"
  OMP_NUM_THREADS=12 $gen --build-only > "$LOGS/build.log" 2>&1; log "sd15 build" $?
  timeout $((END - SECONDS)) $gen --lambdas 1.0 --compile --json "$LOGS/gen_compiled.json" > "$LOGS/gen_compiled.log" 2>&1
  log "compiled bench" $?
  # The same run with a stand-in paced to the compiled GPU's speed (no GPU, ~80 s): how much of the
  # time outside the sampler is this machine's CPU side (encoding, reading), not the GPU's.
  timeout $((END - SECONDS)) python3 benchmarks/generate.py --stub 0.3176 --repeats 1 --lambdas 1.0 \
    --sources 96 --sources-dir /tmp/src96 --model-dir /tmp/tiny --json "$LOGS/gen_stub.json" > "$LOGS/gen_stub.log" 2>&1
  log "stub bench" $?
  # λ = 0.5 (25 of 50 steps) eager: no compile per process, so it fits what is left (~100 s).
  [ $((END - SECONDS)) -gt 100 ] && timeout $((END - SECONDS)) $gen --lambdas 0.5 --json "$LOGS/gen_eager.json" > "$LOGS/gen_eager.log" 2>&1
  log "eager bench" $?
}

base() {
  # configs/base/tiny.yaml holds the GPU recipe (batch 256, 100k corpus); the time box fits the step count.
  timeout 230 python3 -m jobs.pretrain_base --no-progress --set out=/tmp/base --set train.device=cuda \
    --set "model.block_out_channels=$BASE_CHANNELS" --set train.max_minutes="$BASE_MINUTES" \
    --set train.steps=200000 --set corpus.workers=14 > "$LOGS/base.log" 2>&1
  log base $?
  tar czf "$OUT/base.tgz" -C /tmp/base final loss.jsonl config.yaml samples.png loss.png 2>> "$OUT/gpu.txt"
  # The headline's ControlNet (3000 steps x 32 on the 128 low-data scenes; 1000 took ~65 s) and its 4 cells on this base.
  timeout $((END - SECONDS - 10)) python3 -m jobs.sweep --config configs/sweeps/schemes.yaml --out /tmp/hb \
    --set controlnet.model.pretrained=/tmp/base/final --set studies.schemes.enabled=false \
    --set generate.ray.num_actors=1 --set generate.sampler.dtype=float32 > "$LOGS/sweep.log" 2>&1
  log sweep $?
  ray stop --force > /dev/null 2>&1
  tar czf "$OUT/hb.tgz" -C /tmp --exclude=hb/controlnet/final --exclude=hb/controlnet/checkpoints hb 2>> "$OUT/gpu.txt"
}

solvers() {
  # Issue 25's fast-solver target (>= 7 images/s per H100/H200): the bench's SD 1.5-shaped run, compiled,
  # with SOLVER at SOLVER_STEPS (default dpmsolver++ 20; set them to what benchmarks/solvers.py chose on
  # the CPUs) at λ = 1, then λ = 0.5 if time is left. DDIM 50 compiled is the bench job's (2.965 images/s
  # through Ray on an H100, issue 13's notes): run both jobs in one call only on a fresh budget.
  local gen="python3 benchmarks/generate.py --gpu --dtype bfloat16 --batch-size 16 --sources 96 --repeats 1 --model-dir /tmp/sd15 --sources-dir /tmp/src96 --compile --scheduler ${SOLVER:-dpmsolver++} --steps ${SOLVER_STEPS:-20}"
  OMP_NUM_THREADS=12 $gen --build-only > "$LOGS/build.log" 2>&1; log "sd15 build" $?
  timeout $((END - SECONDS)) $gen --lambdas 1.0 --json "$LOGS/gen_solver_l1.json" > "$LOGS/gen_solver_l1.log" 2>&1
  log "solver bench λ = 1" $?
  [ $((END - SECONDS)) -gt 200 ] && timeout $((END - SECONDS)) $gen --lambdas 0.5 --json "$LOGS/gen_solver_l05.json" \
    > "$LOGS/gen_solver_l05.log" 2>&1
  log "solver bench λ = 0.5" $?
}

draw() {
  timeout $((END - SECONDS - 20)) python3 -m jobs.sweep --config configs/sweeps/headline.yaml \
    --set "draws.seeds=[${DRAW:-3}]" --set seg_gpus_per_run=0.25 --set seg_cpus_per_run=3 \
    --set seg.data.workers=2 > "$LOGS/draw.log" 2>&1
  log "draw ${DRAW:-3}" $?
  ray stop --force > /dev/null 2>&1
  cp docs/results/headline-runs.json runs/effect/headline.json runs/effect/headline.md "$OUT/" 2>> "$OUT/gpu.txt"
}

for job in $JOBS; do "$job"; done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
cp "$LOGS"/*.json "$OUT/" 2>/dev/null
exit 0
