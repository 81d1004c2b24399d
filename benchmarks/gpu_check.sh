#!/usr/bin/env bash
# The first GPU session's checks in one command (benchmarks/README.md, "gpu_check"):
#     bash benchmarks/gpu_check.sh "$OUT"
# writes "$OUT"/gpu_check.md (one table: each part ok / failed / not available here) and the logs beside it.
# Without CUDA it is a quick dry run that exits 0. Extra arguments go to benchmarks/gpu_check.py (--help).
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
exec "$PY" benchmarks/gpu_check.py "${1:-${OUT:-gpu_check_out}}" "${@:2}"
