#!/usr/bin/env bash
# The test suite. Tests that need ../shared/datasets skip with a reason where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
# .venv-serve: a real Triton server for tests/test_serve.py, which skip (saying why) where it fails
bash scripts/setup_serve_env.sh || echo "warning: scripts/setup_serve_env.sh failed; the serving tests will skip" >&2
. scripts/setup_env.sh train,demo,dev,rtx,gpu,report
python -m pytest -q "$@"
