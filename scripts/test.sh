#!/usr/bin/env bash
# The test suite. Tests that need ../shared/datasets skip with a reason where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh train,demo,dev,rtx,gpu,report
python -m pytest -q "$@"
