#!/usr/bin/env bash
# The trainer with document masks on and off, on one GPU: the 4-layer DeepSeek-V2-Lite proxy through
# train.py (seq 4096, micro-batch 2), synthetic tokens packed into documents of uniformly random length
# (mean DOC tokens, default 1024: about 4 a sequence; 256: about 16), masks on with the step graphed and
# eager, against the same stream with
# data.document_mask=false and against a stream without documents (one causal sequence a row). MFU counts
# the attention pairs the masks allow (moe_train.train.setup.StepFlops). Usage, from the repository root on
# the GPU machine: bash bench/document_masks.sh   (.whl/ as for compare_commits.sh; DOCS="1024" for one
# document length; STEPS=N logs to step N, default 20; PLAIN=0 skips the run without documents)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=${OUT:-/tmp}/runs; mkdir -p $R; source bench/runs.sh
P="model=deepseek_v2_lite model.num_hidden_layers=4 data=synthetic data.synthetic_vocab=102400 data.seq_len=4096"
P="$P data.batch_size=2 trainer.log_every=5"
last=${STEPS:-20}
[ "${PLAIN:-1}" = 0 ] || train no_documents $PWD 5 $last $P
for doc in ${DOCS:-1024 256}; do
  train masks_on_$doc $PWD 5 $last $P data.synthetic_doc_tokens=$doc
  # an eager step too: the same kernel (cuDNN's ragged one where NVIDIA's cuDNN frontend is installed), its
  # losses beside the graphed step's
  train masks_on_eager_$doc $PWD 5 $last $P data.synthetic_doc_tokens=$doc trainer.cuda_graph=false
  train masks_off_$doc $PWD 5 $last $P data.synthetic_doc_tokens=$doc data.document_mask=false
done
