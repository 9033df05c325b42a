#!/usr/bin/env sh
# Creates .venv (if missing) and installs memory-fidelity into it with the CPU build of torch.
#   sh scripts/setup.sh        -> runtime install
#   sh scripts/setup.sh dev    -> runtime + test tools (pytest, ruff, triton, transformers, ...)
set -eu
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints-cpu.txt -e ".${extras}"
# Byte-compile the package: an editable install leaves its sources uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set every command would compile them again (~0.4 s of imports).
.venv/bin/python -m compileall -q fidelity > /dev/null
