#!/usr/bin/env bash
# Make .venv with everything momos needs, from a machine that has only Python 3.
# torch==2.13.0 goes in first: it is the CPU build on local disk, and with it installed no later
# requirement can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -e ".[dev]"
