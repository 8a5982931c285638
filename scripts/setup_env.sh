#!/usr/bin/env bash
# Creates .venv (once) and installs stmae-edge with the given extras into it. Sourced by the others.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-train,dev}"
python3 -m venv .venv 2>/dev/null || { echo "error: python3 -m venv failed; install python3-venv" >&2; exit 2; }
. .venv/bin/activate
# torch is pinned to 2.13.0 in the train extra: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
