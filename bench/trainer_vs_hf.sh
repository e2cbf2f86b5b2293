#!/usr/bin/env bash
# The single-GPU speed issue's yardstick in one device call: `train.py` on the 6-layer DeepSeek-V2-Lite proxy
# (seq 4096, micro-batch 2, 8 micro-batches a step, synthetic tokens) at this checkout — its default
# precision (bf16_master on CUDA), with AMP=1 trainer.dtype=bf16 (the old default), with FP8=1 trainer.dtype=fp8
# (the FP8 issue's trainer yardstick, against the default in the same call) — and at the old
# checkout, beside transformers' DeepseekV3ForCausalLM in a bare loop at the same micro-batch and
# accumulation (bench/train_throughput.py --accum 8). Training figures: median tokens/s of the logged steps
# after step 4 (metrics.jsonl), as a user reads them. Usage, from this checkout's root on the GPU machine,
# the old one unpacked in OLD_DIR:
#   bash bench/trainer_vs_hf.sh OLD_DIR        (LAYERS, STEPS override 6 and 14; OLD_TOO=0 stops after this
#   checkout's runs)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
NEW=$PWD; OLD=$(cd "${1:?usage: trainer_vs_hf.sh OLD_DIR}" && pwd); R=/tmp/runs; mkdir -p $R
source "$NEW/bench/runs.sh"
L=${LAYERS:-6}; S=${STEPS:-14}
P="model=deepseek_v2_lite model.num_hidden_layers=$L data=synthetic data.synthetic_vocab=102400 data.seq_len=4096"
P="$P data.batch_size=16 parallel.microbatches=8 trainer.log_every=1"
train yard_new $NEW 4 $S $P
[ "${AMP:-0}" = 1 ] && train yard_new_amp $NEW 4 $S $P trainer.dtype=bf16
[ "${FP8:-0}" = 1 ] && train yard_new_fp8 $NEW 4 $S $P trainer.dtype=fp8
[ "${OLD_TOO:-1}" = 1 ] || exit 0
train yard_old $OLD 4 $S $P
PYTHONPATH=$NEW:/tmp/site python bench/train_throughput.py --variants hf:$L:2 --accum 8 --steps 4 --warmup 2 2>&1 | grep -E "^\| (hf|variant)"
