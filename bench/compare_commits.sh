#!/usr/bin/env bash
# Two checkouts, the same user commands, one GPU, interleaved: decode (bench/decode.py, 4-layer proxy) and
# `python train.py model=small`; with PROXY=1 also the 4-layer V2-Lite proxy through train.py (seq 4096,
# batch 2). Runs are stopped once their last step is logged (no checkpoint is written: a proxy checkpoint is
# tens of GB). Usage, from the new checkout's root on the GPU machine, the old one unpacked in OLD_DIR:
#   bash bench/compare_commits.sh OLD_DIR
# DECODE_ROUNDS, SMALL_ROUNDS and PROXY_ROUNDS (default 2) set how many alternating rounds each part runs (0
# skips it). Results print as each run ends, and a table of new/old medians closes the output; the runs'
# folders stay in /tmp (a device call returns few files). NEW_ARGS: overrides given to the new checkout's
# train.py only (a key the old commit lacks, e.g. data.document_mask=false for the same computation). PIN: a
# prefix for every run (e.g. `taskset -c 0-7`, the cores near the GPU), which steadies host-bound runs.
# (`git archive OLD_COMMIT moe_train train.py configs bench pyproject.toml | tar -x -C OLD_DIR` makes it;
# carry it and .whl/, see ../shared/tools/device-wheels.sh.)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1
NEW=$PWD; OLD=$(cd "${1:?usage: compare_commits.sh OLD_DIR}" && pwd); R=/tmp/runs; mkdir -p $R
source "$NEW/bench/runs.sh"
# Host-bound runs drift between machine starts and within one: rounds alternate the order (new-old, then
# old-new), so a drift in time does not favour either checkout; compare the medians over the rounds.
order() { [ $(($1 % 2)) = 1 ] && echo "new old" || echo "old new"; }
for round in $(seq 1 "${DECODE_ROUNDS:-2}"); do
  for tag in $(order $round); do
    tree=$OLD; [ $tag = new ] && tree=$NEW; d=$R/dec_${tag}_$round
    (cd $tree && PYTHONPATH=$tree:/tmp/site timeout 200 $PIN python bench/decode.py --layers 4 --no-offload --batches 1,64 --new 48 --repeats 3 --out $d > $d.log 2>&1) || { echo "decode $tag FAILED"; tail -3 $d.log; }
    echo "== decode $tag round $round"; grep -E "^\| (1|64) \|" $d/*.md 2>/dev/null
  done
done
SMALL="model=small trainer.log_every=10"
for rep in $(seq 1 "${SMALL_ROUNDS:-2}"); do
  for tag in $(order $rep); do
    tree=$OLD; extra=; [ $tag = new ] && tree=$NEW && extra=$NEW_ARGS; train small_$tag$rep $tree 20 150 $SMALL $extra
  done
done
if [ "${PROXY:-0}" = 1 ]; then
  P="model=deepseek_v2_lite model.num_hidden_layers=4 data=synthetic data.synthetic_vocab=102400 data.seq_len=4096"
  P="$P data.batch_size=2 trainer.log_every=5"
  for rep in $(seq 1 "${PROXY_ROUNDS:-2}"); do
    for tag in $(order $rep); do
      tree=$OLD; extra=; [ $tag = new ] && tree=$NEW && extra=$NEW_ARGS; train proxy_$tag$rep $tree 5 25 $P $extra
    done
  done
fi
python3 "$NEW/bench/compare_summary.py" $R
