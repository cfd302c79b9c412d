#!/usr/bin/env bash
# Set up (once) and run the test suite: creates .venv if missing, installs mmdistill with its
# dev extras, then runs pytest without the slow and gpu markers, one worker per core (pytest-xdist
# hands out whole files in collection order; conftest puts the long real-data file first).
# Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest -m "not slow and not gpu" -n auto --dist loadfile --no-loadscope-reorder "$@"
