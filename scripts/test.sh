#!/usr/bin/env sh
# Sets up .venv with the test tools, then lints and runs the whole test suite.
# Extra arguments go to pytest (e.g. `sh scripts/test.sh -k kernels`).
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
