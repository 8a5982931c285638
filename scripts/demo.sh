#!/usr/bin/env bash
# The main job on its embedded default: ELPV solar cells -> train a small ST-MAE -> evaluate -> print.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh train,demo
stmae-edge demo "$@"
