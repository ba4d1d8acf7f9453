#!/usr/bin/env bash
# Compile every candidate listed in a candidates file (NAME<TAB>spattenc options) into OUT/NAME.onnx,
# with the compile report beside it as OUT/NAME.spatten.json (FLOP ratio read by latency.py).
#   bash bench/compile_candidates.sh bench/token_candidates.txt models/cache/minilm/model.onnx bench/out/tokens
set -euo pipefail
list=$1 dense=$2 out=$3
mkdir -p "$out"
grep -v '^#' "$list" | while IFS=$'\t' read -r name opts; do
  [ -n "$name" ] || continue
  # shellcheck disable=SC2086
  spattenc "$dense" -o "$out/$name.onnx" $opts --emit-kept --report "$out/$name.spatten.json" -q
  echo "$name: $(python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d.get('token_schedule'), d.get('flop_ratio'))" "$out/$name.spatten.json")"
done
