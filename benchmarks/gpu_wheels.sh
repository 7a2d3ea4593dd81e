#!/usr/bin/env bash
# Fetch, on a machine with the package registries, the wheels that benchmarks/gpu_check.sh installs on a GPU machine
# whose image has torch/transformers/numpy but no registry access (Python 3.12, x86-64): DeepSpeed (built here: it
# ships as an sdist; pure Python without its ops) and the few of its and vitpipe's needs such images lack.
# Output: .whl/ in the repo root (git-ignored). Usage: bash benchmarks/gpu_wheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PIP=${PIP:-.venv/bin/pip}
rm -rf .whl && mkdir -p .whl
DS=$($PIP show deepspeed 2>/dev/null | sed -n 's/^Version: //p')
$PIP wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==${DS:-0.19.8}"
plat=()
for n in 17 24 27 28 31 34; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
for p in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions simplejpeg; do
  v=$($PIP show "$p" 2>/dev/null | sed -n 's/^Version: //p')  # the versions tested here (pydantic pins its core)
  [ -n "$v" ] && p="$p==$v"
  $PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" \
    --platform manylinux2014_x86_64 --platform any -d .whl "$p"
done
ls -la .whl
