#!/usr/bin/env bash
# Build (and optionally push) the vitpipe images. The image name is defined here once; the Kubernetes and
# cluster-launcher manifests under infra/ use "${IMAGE_REPO}:<version>-<variant>" and tests/infra checks that.
#
# Usage: infra/build.sh [cpu|cuda|all] [--push]        (default: all)
#   IMAGE_REPO=registry.example.com/team/vitpipe infra/build.sh cuda --push
set -euo pipefail
IMAGE_REPO="${IMAGE_REPO:-ghcr.io/vitpipe/vitpipe}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "${repo_root}/pyproject.toml" | head -n1)"
[[ -n "${version}" ]] || { echo "build.sh: no version in ${repo_root}/pyproject.toml" >&2; exit 1; }

target="${1:-all}"
push=0
[[ "${2:-}" == "--push" || "${1:-}" == "--push" ]] && push=1
[[ "${target}" == "--push" ]] && target=all
case "${target}" in
  cpu|cuda) variants=("${target}") ;;
  all) variants=(cpu cuda) ;;
  *) echo "build.sh: unknown variant '${target}' (cpu, cuda or all)" >&2; exit 2 ;;
esac

for variant in "${variants[@]}"; do
  tag="${IMAGE_REPO}:${version}-${variant}"
  echo "building ${tag}"
  DOCKER_BUILDKIT=1 docker build \
    -f "${repo_root}/infra/Dockerfile" \
    --build-arg "VARIANT=${variant}" \
    --build-arg "VITPIPE_VERSION=${version}" \
    -t "${tag}" \
    "${repo_root}"
  if [[ "${push}" == 1 ]]; then
    docker push "${tag}"
  fi
done
