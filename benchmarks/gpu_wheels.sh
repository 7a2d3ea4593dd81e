#!/usr/bin/env bash
# Fetch, on a machine with the package registries, the wheels that benchmarks/gpu_check.sh installs on a GPU machine
# whose image has torch/transformers/numpy but no registry access (Python 3.12, x86-64): DeepSpeed (built here: it
# ships as an sdist; pure Python without its ops) and what it and vitpipe's training path import that such images may
# lack. gpu_check.sh installs each one only if the image cannot import it already (never a second numpy ABI).
# Output: .whl/ in the repo root (git-ignored, ~50 MB: carry it). Usage: bash benchmarks/gpu_wheels.sh [python, 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PIP=${PIP:-.venv/bin/pip}
rm -rf .whl && mkdir -p .whl
DS=$($PIP show deepspeed 2>/dev/null | sed -n 's/^Version: //p')
$PIP wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==${DS:-0.19.8}"
plat=()
for n in 17 24 27 28 31 34; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
# DeepSpeed's requirements (hjson, msgpack, ninja for DeepCompile's JIT-built ops, py-cpuinfo, psutil, einops,
# pydantic and its own), then vitpipe's training path (simplejpeg, pillow, fsspec; scipy: vitpipe.pipeline.dedup)
for p in hjson msgpack ninja py-cpuinfo psutil einops pydantic pydantic-core annotated-types typing-inspection \
         typing-extensions simplejpeg pillow fsspec scipy; do
  v=$($PIP show "$p" 2>/dev/null | sed -n 's/^Version: //p')  # the versions tested here (pydantic pins its core)
  [ -n "$v" ] && p="$p==$v"
  $PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" \
    --platform manylinux2014_x86_64 --platform any -d .whl "$p"
done
ls -la .whl
du -sh .whl
