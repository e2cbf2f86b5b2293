#!/usr/bin/env bash
# The single-GPU speed issue's `small` goal in one device call: `python train.py model=small` (its default batch)
# at this checkout with CUDA graphs on and off, with graphs and each block's phases compiled
# (trainer.compile=phases), and at an old commit, alternating, each until step LAST is logged; then the
# profiler's host against GPU-busy ms for the graphed step, plain and compiled (bench/step_profile.py). Prints
# each run's last losses (graphs on and off should agree; compiled ones round differently) and median
# tokens/s after step 20.
# Usage, from the repository root on the GPU machine, the old checkout unpacked in OLD_DIR as for
# compare_commits.sh:   bash bench/host_overhead.sh OLD_DIR      (LAST: default 60; ROUNDS: default 1;
# RUNS: which runs, default "graphs old eager compiled"; PROFILES: which profiles, default "plain compiled")
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
NEW=$PWD; OLD=$(cd "${1:?usage: host_overhead.sh OLD_DIR}" && pwd); R=/tmp/host_overhead; mkdir -p $R
LAST=${LAST:-60}
report() { python3 -c "
import json, statistics
r = [json.loads(l) for l in open('$R/$1/metrics.jsonl') if '\"train\"' in l]
late = [x['tokens_per_s'] for x in r if x['step'] > 20]
print('$1', 'loss', [round(x['loss'], 5) for x in r][-3:], 'tokens/s median', round(statistics.median(late)) if late else '-')"; }
run() { tag=$1; tree=$2; shift 2
  (cd $tree && PYTHONPATH=$tree:/tmp/site timeout 300 python train.py model=small trainer.max_steps=$LAST \
    trainer.log_every=10 trainer.eval_every=100000 logger.console=false \
    trainer.progress=false hydra.run.dir=$R/$tag "$@" > $R/$tag.log 2>&1) && report $tag || { echo "$tag FAILED"; tail -5 $R/$tag.log; }
  rm -rf $R/$tag/checkpoints; }
for round in $(seq 1 "${ROUNDS:-1}"); do
  for kind in ${RUNS:-graphs old eager compiled}; do
    case $kind in
      graphs) run graphs_$round $NEW trainer.cuda_graph=true ;;
      old) run old_$round $OLD ;;
      eager) run eager_$round $NEW trainer.cuda_graph=false ;;
      compiled) run compiled_$round $NEW trainer.cuda_graph=true trainer.compile=phases ;;
    esac
  done
done
for kind in ${PROFILES:-plain compiled}; do
  extra=; [ "$kind" = compiled ] && extra=trainer.compile=phases
  PYTHONPATH=$NEW:/tmp/site timeout 200 python bench/step_profile.py model=small trainer.cuda_graph=true $extra --steps 5 2>&1 | grep -v Warning | head -24
done
