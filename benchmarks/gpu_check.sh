#!/usr/bin/env bash
# One prepared call on a GPU machine for the pretraining-step figures (README "Performance"; issue: the DeepSpeed step
# at the speed of a bare loop), then, with what is left, the model-only comparison with HF transformers:
#   pretrain_speed.py  bare loop (eager, compiled) vs vitpipe's production step (Trainer.step) under ZeRO-1/2/3 and
#                      pretrain.compile=inductor|deepcompile: img/s, MFU, host syncs, attention kernel, breakdown,
#                      largest H/14 micro-batch
#   model_speed.py     vitpipe vs HF transformers, bf16 autocast, eager and torch.compile (B/16 b256, H/14 b64)
# The image needs torch (CUDA) and transformers; what else vitpipe needs comes as wheels:
#   here:   bash benchmarks/gpu_wheels.sh                 # DeepSpeed, pydantic, simplejpeg, ... into .whl/
#   device: bash benchmarks/gpu_check.sh                  # with .whl carried; BUDGET=seconds (default 540)
# Each step gets what is left of the budget; pretrain_speed also stops starting rows near its cap, so its tables
# print. Logs go to $OUT (or benchmarks/out); the tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-benchmarks/out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TORCHINDUCTOR_CACHE_DIR=/tmp/vp-inductor
start=$(date +%s)
mkdir -p /tmp/vp-site
# a wheel goes in only when the image cannot import its module already (its numpy, its scipy: no ABI mix-ups)
declare -A MOD=([deepspeed]=-always- [hjson]=hjson [msgpack]=msgpack [ninja]=ninja [py_cpuinfo]=cpuinfo
                [psutil]=psutil [einops]=einops [pydantic]=pydantic [pydantic_core]=pydantic_core
                [annotated_types]=annotated_types [typing_inspection]=typing_inspection
                [typing_extensions]=typing_extensions [simplejpeg]=simplejpeg [pillow]=PIL [fsspec]=fsspec
                [scipy]=scipy)
wheels=()
for w in .whl/*.whl; do
  [ -e "$w" ] || continue
  dist=$(basename "$w" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
  mod=${MOD[$dist]:-$dist}
  if [ "$mod" = "-always-" ] || ! python3 -c "import $mod" 2>/dev/null; then wheels+=("$w"); fi
done
if ((${#wheels[@]})); then
  echo "installing: ${wheels[*]##*/}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vp-site \
    "${wheels[@]}"
fi
export PYTHONPATH=/tmp/vp-site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/vp-site/bin:$PATH
# `vitpipe` importable without installing (setuptools maps the repo root to the package).
mkdir -p /tmp/vp-src && ln -sfn "$PWD" /tmp/vp-src/vitpipe
export PYTHONPATH=/tmp/vp-src:$PYTHONPATH
python3 -c 'import torch, transformers, deepspeed, vitpipe.jobs.train.trainer
print("torch", torch.__version__, "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__,
      "|", torch.cuda.get_device_name())' 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit,memory.total --format=csv 2>&1 | tee -a "$OUT/env.txt"
if command -v nvcc >/dev/null; then
  nvcc --version | tail -1 | tee -a "$OUT/env.txt"
else
  echo "no nvcc (DeepCompile's ops cannot build)" | tee -a "$OUT/env.txt"
fi

step() {  # step NAME CAP_S CMD...: run CMD under min(CAP_S, budget left), log to $OUT/NAME.txt
  local name=$1 cap=$2 left
  shift 2
  left=$((BUDGET - ($(date +%s) - start)))
  if ((left < 45)); then echo "== $name: skipped, budget spent" | tee "$OUT/$name.txt"; return; fi
  ((cap > left)) && cap=$left
  echo "== $name (at most ${cap}s): $*"
  timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.txt" 2>&1
  echo "== $name: exit $? after $(($(date +%s) - start))s in all"
}
# rows start only while 75 s of the step's cap remain: the last row and the tables fit in what is left
left=$((BUDGET - ($(date +%s) - start)))
cap=$((left < 420 ? left : 420))
step pretrain_speed "$cap" python3 benchmarks/pretrain_speed.py --device cuda --max-batch --budget-s $((cap - 75))
step model_speed 240 python3 benchmarks/model_speed.py --device cuda --compile --cases H/14@224:64 B/16@224:256
for f in pretrain_speed model_speed; do
  echo "---- $f"
  grep -v -E "WARNING|warn|^\s*$|Traceback|^  File|^\[rank" "$OUT/$f.txt" | tail -40
done
