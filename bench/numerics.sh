#!/usr/bin/env bash
# The single-GPU speed issue's numerics check in one device call: `python train.py model=small` for 1,000
# steps on the default corpus under the new default precision (trainer.dtype=auto: bf16 weights, fp32
# masters) and under the old path (trainer.dtype=bf16: fp32 weights under bf16 autocast), each with two
# seeds, so the old path's seed-to-seed spread stands beside the difference. Each run's metrics.jsonl is copied to $OUT (or
# OUT_DIR) as numerics_<precision>_<seed>.jsonl; `python bench/compare_curves.py DIR` then prints the final
# validation losses and plots the curves. Usage, from the repository root on the GPU machine:
#   bash bench/numerics.sh        (STEPS overrides 1000; SEEDS "1234 1235" and PRECISIONS "auto bf16" pick runs)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
DEST=${OUT_DIR:-${OUT:?set OUT or OUT_DIR}}; R=/tmp/numerics; mkdir -p $R $DEST
for seed in ${SEEDS:-1234 1235}; do
  for precision in ${PRECISIONS:-auto bf16}; do
    tag=${precision}_$seed; SECONDS=0
    PYTHONPATH=$PWD:/tmp/site python train.py model=small trainer.max_steps=${STEPS:-1000} \
      trainer.seed=$seed \
      trainer.dtype=$precision trainer.progress=false logger.console=false trainer.ckpt_every_minutes=0 \
      hydra.run.dir=$R/$tag > $R/$tag.log 2>&1 || { echo "$tag FAILED"; tail -3 $R/$tag.log; continue; }
    rm -rf $R/$tag/checkpoints  # the end's checkpoint: not needed here
    cp $R/$tag/metrics.jsonl $DEST/numerics_$tag.jsonl && echo "$tag done (${SECONDS}s)"
  done
done
