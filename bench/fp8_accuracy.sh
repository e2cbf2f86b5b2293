#!/usr/bin/env bash
# The FP8 issue's accuracy check in one device call: `python train.py model=fp8_small` (every GEMM tiles by 128
# with K >= 1024, ~116M active parameters, FP8 runs 100% of the recipe's GEMM work) for 1,000 steps on the
# default corpus, in fp8 and in the bf16 default (trainer.dtype=auto: bf16 weights, fp32 masters) with the same
# seed, and the bf16 default with a second seed for the seed-to-seed difference. Each run's metrics.jsonl is
# copied to $OUT (or OUT_DIR) as fp8acc_<precision>_<seed>.jsonl; `python bench/compare_curves.py DIR` prints
# the final validation losses and plots the curves. Usage, from the repository root on the GPU machine:
#   bash bench/fp8_accuracy.sh        (STEPS overrides 1000; RUNS picks a subset, e.g. "fp8:1234 auto:1234")
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
DEST=${OUT_DIR:-${OUT:?set OUT or OUT_DIR}}; R=/tmp/fp8acc; mkdir -p $R $DEST
for run in ${RUNS:-fp8:1234 auto:1234 auto:1235}; do
  precision=${run%%:*}; seed=${run##*:}; tag=${precision}_$seed; SECONDS=0
  PYTHONPATH=$PWD:/tmp/site python train.py model=fp8_small trainer.max_steps=${STEPS:-1000} \
    trainer.seed=$seed trainer.dtype=$precision trainer.progress=false logger.console=false \
    trainer.ckpt_every_minutes=0 hydra.run.dir=$R/$tag > $R/$tag.log 2>&1 || { echo "$tag FAILED"; tail -3 $R/$tag.log; continue; }
  rm -rf $R/$tag/checkpoints  # the end's checkpoint: not needed here
  grep -m1 "FP8" $R/$tag.log
  cp $R/$tag/metrics.jsonl $DEST/fp8acc_$tag.jsonl && echo "$tag done (${SECONDS}s)"
done
