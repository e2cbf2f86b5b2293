#!/usr/bin/env bash
# Two checkouts, the same user commands, one GPU, interleaved: decode (bench/decode.py, 4-layer proxy) and
# `python train.py model=small`; with PROXY=1 also the 4-layer V2-Lite proxy through train.py (seq 4096,
# batch 2). Runs are stopped once their last step is logged (no checkpoint is written: a proxy checkpoint is
# tens of GB). Usage, from the new checkout's root on the GPU machine, the old one unpacked in OLD_DIR:
#   bash bench/compare_commits.sh OLD_DIR
# (`git archive OLD_COMMIT moe_train train.py configs bench pyproject.toml | tar -x -C OLD_DIR` makes it;
# carry it and .whl/, see ../shared/tools/device-wheels.sh.)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1
NEW=$PWD; OLD=$(cd "${1:?usage: compare_commits.sh OLD_DIR}" && pwd); R=/tmp/runs; mkdir -p $R
med() { python3 -c "
import json,statistics
r=[json.loads(l) for l in open('$1') if '\"train\"' in l]
r=[x for x in r if x['step']>$2]
print(round(statistics.median([x['tokens_per_s'] for x in r])), len(r))"; }
train() { tag=$1; tree=$2; skip=$3; last=$4; shift 4
  ( cd $tree && PYTHONPATH=$tree:/tmp/site exec python train.py hydra.run.dir=$R/$tag logger.console=false trainer.progress=false trainer.eval_every=100000 trainer.max_steps=$((last+1)) "$@" > $R/$tag.log 2>&1 ) &
  pid=$!
  for i in $(seq 1 300); do grep -q "\"step\": $last," $R/$tag/metrics.jsonl 2>/dev/null && break; kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf $R/$tag/checkpoints
  [ -f $R/$tag/metrics.jsonl ] && echo "$tag tokens/s(median, n) $(med $R/$tag/metrics.jsonl $skip)" || { echo "$tag FAILED"; tail -3 $R/$tag.log; }; }
for tag in new old; do
  tree=$OLD; [ $tag = new ] && tree=$NEW
  (cd $tree && PYTHONPATH=$tree:/tmp/site timeout 200 python bench/decode.py --layers 4 --no-offload --batches 1,64 --new 48 --out $R/dec_$tag > $R/dec_$tag.log 2>&1) || { echo "decode $tag FAILED"; tail -3 $R/dec_$tag.log; }
  echo "== decode $tag"; grep "|" $R/dec_$tag/*.md 2>/dev/null | head -6
done
SMALL="model=small trainer.log_every=10"
for rep in 1 2; do train small_new$rep $NEW 20 150 $SMALL; train small_old$rep $OLD 20 150 $SMALL; done
if [ "${PROXY:-0}" = 1 ]; then
  P="model=deepseek_v2_lite model.num_hidden_layers=4 data=synthetic data.synthetic_vocab=102400 data.seq_len=4096"
  P="$P data.batch_size=2 trainer.log_every=5"
  for rep in 1 2; do train proxy_new$rep $NEW 5 25 $P; train proxy_old$rep $OLD 5 25 $P; done
fi
