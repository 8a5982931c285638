#!/usr/bin/env bash
# The test suite. Tests that need ../shared/datasets skip with a reason where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
# .venv-serve: a real Triton server for tests/test_serve.py, which skip (saying why) where it fails
bash scripts/setup_serve_env.sh || echo "warning: scripts/setup_serve_env.sh failed; the serving tests will skip" >&2
. scripts/setup_env.sh train,demo,dev,rtx,gpu,report
# One pytest worker per core, up to 4 (each holds its own tiny models, about 2 GB at its peak); a worker
# keeps its cores to itself (tests/conftest.py). STMAE_TEST_WORKERS=1 runs the suite in one process.
workers="${STMAE_TEST_WORKERS:-$(python -c 'from stmae_edge.machine import available_cores; print(min(4, available_cores()))')}"
if [ "$workers" -gt 1 ]; then
  python -m pytest -q -n "$workers" --dist loadfile "$@"
else
  python -m pytest -q "$@"
fi
