#!/usr/bin/env bash
# The single-GPU speed issue's `small` goal in one device call: `python train.py model=small` (its default batch)
# at this checkout as a user runs it (default: CUDA graphs, each block's phases compiled), without compiling
# (trainer.compile=none) with graphs on and off, and at an old commit, alternating, each until step LAST is
# logged; then the profiler's host against GPU-busy ms for the step, as run by default and uncompiled
# (bench/step_profile.py, with the call sites that issue the most ops). Prints each run's last losses (the
# uncompiled ones with graphs on and off should agree; compiled ones round differently), median tokens/s after
# step 20, and each run's wall seconds (start-up and compiling included).
# Usage, from the repository root on the GPU machine, the old checkout unpacked in OLD_DIR as for
# compare_commits.sh:   bash bench/host_overhead.sh OLD_DIR      (LAST: default 60; ROUNDS: default 1;
# RUNS: which runs, default "default old graphs eager"; PROFILES: which profiles, default "default graphs",
# empty for none)
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
print('$1', 'loss', [round(x['loss'], 5) for x in r][-3:], 'tokens/s median', round(statistics.median(late)) if late else '-',
      'whole run $2 s')"; }
run() { tag=$1; tree=$2; shift 2; t0=$SECONDS
  (cd $tree && PYTHONPATH=$tree:/tmp/site timeout 300 python train.py model=small trainer.max_steps=$LAST \
    trainer.log_every=10 trainer.eval_every=100000 logger.console=false \
    trainer.progress=false hydra.run.dir=$R/$tag "$@" > $R/$tag.log 2>&1) && report $tag $((SECONDS - t0)) || { echo "$tag FAILED"; tail -5 $R/$tag.log; }
  rm -rf $R/$tag/checkpoints; }
for round in $(seq 1 "${ROUNDS:-1}"); do
  for kind in ${RUNS:-default old graphs eager}; do
    case $kind in
      default) run default_$round $NEW ;;
      old) run old_$round $OLD ;;
      graphs) run graphs_$round $NEW trainer.cuda_graph=true trainer.compile=none ;;
      eager) run eager_$round $NEW trainer.cuda_graph=false trainer.compile=none ;;
    esac
  done
done
for kind in ${PROFILES-default graphs}; do
  extra=; [ "$kind" = graphs ] && extra="trainer.cuda_graph=true trainer.compile=none"
  PYTHONPATH=$NEW:/tmp/site timeout 200 python bench/step_profile.py model=small $extra --steps 5 --top 8 --sites 25 2>&1 \
    | grep -v Warning | grep -v "^USDT" | head -${PROFILE_LINES:-80}
done
