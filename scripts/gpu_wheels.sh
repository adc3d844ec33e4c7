#!/usr/bin/env bash
# Wheels for a GPU machine that has python3 with a CUDA build of torch but no package index:
# downloads the project's other dependencies (the versions installed in .venv) for that machine's Python
# into .whl/, which scripts/gpu_check.sh installs there. Run it here, where the index is reachable.
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION]     (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
pyver="${1:-3.12}"
make -s install
mkdir -p .whl
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for pkg in lmdb addict yapf mmengine termcolor platformdirs; do
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pkg==$(version "$pkg")"
done
# basicsr 1.4.2 is published as a source archive only; its wheel is pure Python.
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "basicsr==$(version basicsr)"
ls .whl
