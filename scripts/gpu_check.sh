#!/usr/bin/env bash
# One call on a machine with a GPU checks the whole GPU path: CUDA tests, the CUDA benchmark, NLRN and
# N3Net training under torchrun (NCCL, bf16, compile) and a test run; see scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
#   bash scripts/gpu_check.sh OUT_DIR --smoke  (the same steps on the CPU, 2 iterations: checks the script)
# On a machine without a package index whose python3 already has torch with CUDA, put wheels of the other
# dependencies (basicsr, lmdb, mmengine, addict, yapf, termcolor, platformdirs) in .whl/: they are installed
# into /tmp/nl_plugin_site and that python3 runs the check, with this checkout on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ ! -x .venv/bin/python ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/nl_plugin_site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/nl_plugin_site${PYTHONPATH:+:$PYTHONPATH}"
    exec python3 scripts/gpu_check.py "$@"
fi
make -s install                      # creates .venv and installs the project if that has not been done
exec .venv/bin/python scripts/gpu_check.py "$@"
