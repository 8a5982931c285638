#!/usr/bin/env bash
# Creates .venv (once) and installs stmae-edge with the given extras into it. Sourced by the others.
# Re-installs only when pyproject.toml or the extras change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-train,dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || { echo "error: 'python3 -m venv' failed; install Python 3.10+ with venv" >&2; exit 2; }
fi
. .venv/bin/activate
stamp=".venv/.stmae-edge-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${extras}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch is pinned to 2.13.0 in the train extra; see README ("Installing") for other platforms.
  python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
  echo "$want" > "$stamp"
fi
