#!/usr/bin/env bash
# One call on a machine with a GPU checks the whole GPU path: CUDA tests, the CUDA benchmark, NLRN and
# N3Net training under torchrun (NCCL, bf16, compile) and a test run; see scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
#   bash scripts/gpu_check.sh OUT_DIR --smoke  (the same steps on the CPU, 2 iterations: checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install                      # creates .venv and installs the project if that has not been done
export PYTHONUNBUFFERED=1
exec .venv/bin/python scripts/gpu_check.py "$@"
