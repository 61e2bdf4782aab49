#!/usr/bin/env bash
# Paper-scale GPU check, one H100/H200, about 8 minutes: every stage's training step at ViT-B sizes in
# bf16 through the real CLI (CPT teachers at 224; distillation per level and fine-tuning at 224 and 512;
# fine-tuning at 512 again with activation checkpointing), then a 1-GPU DDP fine-tune with evaluation.
# Throughput (images/s) and peak CUDA memory come from each stage's TensorBoard scalars
# (perf/images_per_s, perf/peak_memory_gib) and are printed as `name: value` lines by perf_summary.py.
#
#   bash benchmarks/gpu_check.sh                      # the paper profile on the GPU
#   PROFILE=tiny ACCEL=cpu SIZES=64 bash benchmarks/gpu_check.sh   # a CPU dry run of the script itself
#
# Data: random slices (throughput does not depend on content) and the built-in demo, written under WORK.
set -uo pipefail
cd "$(dirname "$0")/.."

PROFILE="${PROFILE:-paper}"
ACCEL="${ACCEL:-gpu}"
PRECISION="${PRECISION:-bf16-mixed}"
SIZES="${SIZES:-224 512}"
STEPS="${STEPS:-12}"          # training batches per measured run; throughput is read after the first 4
WORK="${WORK:-$(mktemp -d /tmp/samora-gpu-check.XXXX)}"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
SAMORA=("$PY" -m samora_pl)
RUNS="$WORK/runs"
POOL="$WORK/pool"
STATUS=0

echo "gpu_check: profile=$PROFILE accelerator=$ACCEL precision=$PRECISION sizes=[$SIZES] work=$WORK"
"$PY" - "$POOL" <<'EOF'
import sys, pathlib, numpy as np
pool = pathlib.Path(sys.argv[1]); pool.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for k in range(2048):  # enough for STEPS batches of the paper's CPT batch (128)
    np.savez(pool / f"s{k:04d}.npz", image=rng.random((256, 256), dtype=np.float32))
EOF

COMMON=(profile="$PROFILE" runs_dir="$RUNS" trainer.accelerator="$ACCEL" trainer.precision="$PRECISION"
        trainer.limit_train_batches="$STEPS" trainer.log_every_n_steps=4 data.name=demo data.dir="$WORK/demo"
        "cpt.sources=[{path: '$POOL', format: npz}]"
        model.checkpoint=none cpt.simclr.from_scratch=true cpt.mae.from_scratch=true)  # throughput: random weights

step() {  # name, timeout seconds, samora arguments...
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  if timeout "$limit" "${SAMORA[@]}" "$@" > "$WORK/$name.log" 2>&1; then
    echo "ok: $name ($((SECONDS - start)) s)"
  else
    echo "FAILED: $name ($((SECONDS - start)) s), last lines of $WORK/$name.log:"; tail -n 5 "$WORK/$name.log"; STATUS=1
  fi
}

first="${SIZES%% *}"
step cpt_simclr 120 cpt cpt.teacher=simclr run=s"$first" cpt.simclr.max_epochs=1 "${COMMON[@]}"
step cpt_mae 120 cpt cpt.teacher=mae run=s"$first" cpt.mae.max_epochs=1 "${COMMON[@]}"
for size in $SIZES; do
  for level in image patch pixel; do
    teacher=()
    [ "$level" = image ] && teacher=(distill.teacher="$RUNS/s$first/cpt/simclr/teacher.pt")
    [ "$level" = patch ] && teacher=(distill.teacher="$RUNS/s$first/cpt/mae/teacher.pt")
    step "distill_${level}_$size" 90 distill distill.level="$level" run=s"$size" model.img_size="$size" \
      distill.max_epochs=1 "${teacher[@]}" "${COMMON[@]}"
  done
  step "finetune_$size" 90 finetune run=s"$size" model.img_size="$size" trainer.max_epochs=3 \
    finetune.evaluate=false finetune.tag=bench "${COMMON[@]}"
done
last="${SIZES##* }"
step "finetune_${last}_grad_checkpoint" 90 finetune run=s"$last" model.img_size="$last" trainer.max_epochs=3 \
  finetune.evaluate=false model.grad_checkpoint=true finetune.tag=bench-gc "${COMMON[@]}"
step ddp_finetune_evaluate 150 finetune run=s"$first" model.img_size="$first" trainer.max_epochs=1 \
  trainer.strategy=ddp trainer.devices=1 finetune.tag=ddp-smoke "${COMMON[@]}"

"$PY" benchmarks/perf_summary.py "$RUNS" || STATUS=1
grep -hF "| **Mean**" "$RUNS/s$first/finetune/ddp-smoke/results.md" || { echo "FAILED: no DDP results table"; STATUS=1; }
echo "gpu_check: wall ${SECONDS} s, status $STATUS"
exit $STATUS
