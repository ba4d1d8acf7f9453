#!/usr/bin/env bash
# Quality of head/value candidates (bench/out/heads/NAME.onnx), one embed_eval.py process per model
# (several sessions in one process were OOM-killed before); same sizes as the token-pruning runs.
#   bash bench/heads_quality.sh NAME...
set -uo pipefail
for c in "$@"; do
  nice -n 10 python bench/embed_eval.py --dense models/cache/minilm/model.onnx --candidate "$c=bench/out/heads/$c.onnx" \
    --task imdb sst2 --n-train imdb=1000,sst2=2000 --n-test imdb=500,sst2=all --pooling mean --batch-size 16 \
    --name "minilm-heads-$c" || echo "FAILED $c"
done
