#!/usr/bin/env bash
# Start a single-machine MLflow tracking server: sqlite backend store, local artifact folder served through the
# server (clients upload over HTTP, so the same URI works from Ray workers on this machine), bound to 127.0.0.1.
#
# Usage: infra/mlflow/serve_local.sh [--dir DIR] [--port PORT] [--host HOST]
#   --dir   where mlflow.db and artifacts/ live   (default: $MLFLOW_LOCAL_DIR or ~/.vitpipe/mlflow)
#   --port  TCP port                               (default: $MLFLOW_PORT or 5000)
#   --host  interface to bind                      (default: 127.0.0.1; anything else is exposed to the network
#                                                   without authentication: use infra/mlflow/docker-compose.yml)
# Then, in the shell that runs vitpipe:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# The mlflow executable is $MLFLOW_BIN, else `mlflow` on PATH. The server runs in the foreground (exec).
set -euo pipefail

dir="${MLFLOW_LOCAL_DIR:-${HOME}/.vitpipe/mlflow}"
port="${MLFLOW_PORT:-5000}"
host="127.0.0.1"

die() { echo "serve_local.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; dir="$2"; shift 2 ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a value"; port="$2"; shift 2 ;;
    --host) [[ $# -ge 2 ]] || die "--host needs a value"; host="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

if ! [[ "${port}" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  die "--port must be 1-65535, got '${port}'"
fi
mlflow_bin="${MLFLOW_BIN:-mlflow}"
command -v "${mlflow_bin}" > /dev/null || die "'${mlflow_bin}' not found: install mlflow (pip install mlflow) or set MLFLOW_BIN"
case "${host}" in
  127.0.0.1|localhost|::1) ;;
  *) echo "serve_local.sh: warning: binding ${host}: this server has no authentication" >&2 ;;
esac

mkdir -p "${dir}/artifacts"
dir="$(cd "${dir}" && pwd)"   # sqlite URIs and the artifact destination need an absolute path

echo "serve_local.sh: MLflow on http://${host}:${port} (store ${dir}); export MLFLOW_TRACKING_URI=http://${host}:${port}" >&2
exec "${mlflow_bin}" server \
  --host "${host}" \
  --port "${port}" \
  --backend-store-uri "sqlite:///${dir}/mlflow.db" \
  --artifacts-destination "${dir}/artifacts" \
  --serve-artifacts \
  --workers 1
