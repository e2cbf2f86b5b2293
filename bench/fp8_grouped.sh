#!/usr/bin/env bash
# The grouped Triton FP8 GEMMs (ops/fp8_grouped_triton.py) on the GPU in one device call: the routed experts of
# DeepSeek-V3's shape and of the V2-Lite proxy's, forward plus backward, in bf16, with a GEMM per expert and
# with the grouped kernels (speed, and their error against the per-expert GEMMs on the same FP8 values:
# bench/fp8_gemm.py --parts experts); then `python train.py model=fp8_small trainer.dtype=fp8` for STEPS steps
# eager and replayed from CUDA graphs (their losses should agree: FP8 steps read nothing back with these
# kernels), with tokens/s; then every FP8 GEMM shape's error against fp32 in the proxy and in fp8_small
# (bench/fp8_gemm.py --parts shapes). Usage, from the repository root on the GPU machine:
#   bash bench/fp8_grouped.sh        (STEPS: default 20; PARTS: default "experts graphs shapes")
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/fp8_grouped; mkdir -p $R
for part in ${PARTS:-experts graphs shapes}; do
  date -u
  case $part in
    experts)
      python bench/fp8_gemm.py --parts experts --iters 3 2>&1 | grep "^|"
      python bench/fp8_gemm.py --parts experts --iters 3 --experts 2048,1408,64,49152 2>&1 | grep "^|" ;;
    graphs)
      for g in false true; do
        python train.py model=fp8_small trainer.dtype=fp8 trainer.max_steps=${STEPS:-20} trainer.log_every=5 \
          trainer.eval_every=100000 trainer.cuda_graph=$g logger.console=false trainer.progress=false \
          trainer.ckpt_every_minutes=0 hydra.run.dir=$R/graphs_$g > $R/graphs_$g.log 2>&1 \
          || { echo "cuda_graph=$g FAILED"; tail -4 $R/graphs_$g.log; continue; }
        python3 -c "
import json
r = [json.loads(l) for l in open('$R/graphs_$g/metrics.jsonl') if '\"train\"' in l]
print('cuda_graph=$g', [(x['step'], round(x['loss'], 5), round(x['tokens_per_s'])) for x in r])"
      done ;;
    shapes)
      python bench/fp8_gemm.py --parts shapes 2>&1 | grep "^|"
      python bench/fp8_gemm.py --parts shapes --model model=fp8_small 2>&1 | grep "^|" ;;
  esac
done
date -u
