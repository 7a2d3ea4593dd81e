#!/usr/bin/env bash
# One prepared call on a GPU machine for the figures issues #3 (model) and #5 (pretrain) ask for:
#   model_speed.py   vitpipe vs HF transformers, bf16 autocast, eager and torch.compile: B/16@224 b256, H/14@224 b64
#   pretrain_speed.py  DeepSpeed ZeRO-1/2/3 (with and without activation checkpointing) vs the bare loop
# The image needs torch (CUDA) and transformers; what else vitpipe needs there comes as wheels:
#   here:   bash benchmarks/gpu_wheels.sh                 # DeepSpeed, pydantic, simplejpeg, ... into .whl/
#   device: bash benchmarks/gpu_check.sh                  # with .whl carried; BUDGET=seconds (default 540)
# Each step gets what is left of the budget, so a slow compile cannot eat the whole call. Logs go to $OUT
# (or benchmarks/out); the tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
start=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vp-site .whl/*.whl \
    && export PYTHONPATH=/tmp/vp-site${PYTHONPATH:+:$PYTHONPATH}
fi
# `vitpipe` importable without installing (setuptools maps the repo root to the package).
mkdir -p /tmp/vp-src && ln -sfn "$PWD" /tmp/vp-src/vitpipe
export PYTHONPATH=/tmp/vp-src${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import torch, transformers, vitpipe.models as m
print("torch", torch.__version__, "| transformers", transformers.__version__, "|", torch.cuda.get_device_name())' \
  2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$OUT/env.txt"

step() {  # step NAME CAP_S CMD...: run CMD under min(CAP_S, budget left), log to $OUT/NAME.txt
  local name=$1 cap=$2 left
  shift 2
  left=$((BUDGET - ($(date +%s) - start)))
  if ((left < 30)); then echo "== $name: skipped, budget spent" | tee "$OUT/$name.txt"; return; fi
  ((cap > left)) && cap=$left
  echo "== $name (at most ${cap}s): $*"
  timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.txt" 2>&1
  echo "== $name: exit $? after $(($(date +%s) - start))s in all"
}
step model_speed 330 python3 benchmarks/model_speed.py --device cuda --compile --cases B/16@224:256 H/14@224:64
step pretrain_speed 300 python3 benchmarks/pretrain_speed.py --device cuda --variants B/16,H/14 --zero-stages 1,2,3
for f in model_speed pretrain_speed; do
  echo "---- $f"
  grep -v -E "WARNING|warn|^\s*$|Traceback|^  File" "$OUT/$f.txt" | tail -25
done
