# Helpers the bench shell scripts share; source it with R (the runs' folder) set.
# med FILE SKIP: median tokens/s (and mfu, where logged) of the train records after step SKIP, and their count.
med() { python3 -c "
import json,statistics
r=[json.loads(l) for l in open('$1') if '\"train\"' in l]
r=[x for x in r if x['step']>$2]
m=[x['mfu'] for x in r if 'mfu' in x]
print(round(statistics.median([x['tokens_per_s'] for x in r])), len(r), 'mfu %.3f' % statistics.median(m) if m else '')"; }
# train TAG TREE SKIP LAST OVERRIDES...: train.py in TREE until step LAST is logged, then stopped (no checkpoint);
# PIN, if set, prefixes the command (e.g. taskset)
train() { SECONDS=0; tag=$1; tree=$2; skip=$3; last=$4; shift 4
  ( cd $tree && PYTHONPATH=$tree:/tmp/site exec $PIN python train.py hydra.run.dir=$R/$tag logger.console=false trainer.progress=false trainer.eval_every=100000 trainer.max_steps=$((last+1)) "$@" > $R/$tag.log 2>&1 ) &
  pid=$!
  for i in $(seq 1 300); do grep -q "\"step\": $last," $R/$tag/metrics.jsonl 2>/dev/null && break; kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf $R/$tag/checkpoints
  [ -f $R/$tag/metrics.jsonl ] && echo "$tag tokens/s(median, n) $(med $R/$tag/metrics.jsonl $skip) (${SECONDS}s)" || { echo "$tag FAILED"; tail -3 $R/$tag.log; }; }
