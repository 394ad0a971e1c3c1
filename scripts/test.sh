#!/usr/bin/env bash
# The test command: set up (idempotent, fast when done) and run the whole suite.
# GPU tests skip with a reason on machines without CUDA. Extra arguments go to pytest (e.g. -m unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest "$@"
