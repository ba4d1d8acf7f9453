#!/usr/bin/env bash
# Latency at 512 tokens (WikiText-2) of the head/value candidates and the token-only baselines, all
# interleaved with the dense model in one latency.py run (under the shared latency lock).
#   bash bench/heads_latency.sh NAME [extra latency.py options]
set -euo pipefail
name=$1; shift
H=bench/out/heads
cands=()
for c in paper-h50 paper-h30 cal-h50 cal-h30 cal-c30 v50 t0.5 t0.5-cal-h50 t0.4-cal-h50 t0.3-cal-h50 t0.4-paper-h50 t0.4 t0.3 cal-h20; do
  cands+=(--candidate "$c=$H/$c.onnx")
done

uptime
flock /tmp/spattenc-latency.lock python bench/latency.py --dense models/cache/minilm/model.onnx "${cands[@]}" \
  --lengths 512 --n-inputs 10 --n-imdb 0 --repeats 3 --warmup 2 --name "$name" "$@"
uptime
