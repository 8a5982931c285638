#!/usr/bin/env bash
# Creates .venv (once) and installs stmae-edge with the given extras into it. Sourced by the others.
# Installs only when pyproject.toml changed or an extra is asked for that .venv does not have yet, so
# the demo (train,demo) and the tests (more extras) share one .venv without reinstalling in turn.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-train,dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || { echo "error: 'python3 -m venv' failed; install Python 3.10+ with venv" >&2; exit 2; }
fi
. .venv/bin/activate
stamp=".venv/.stmae-edge-installed"
project="$(sha256sum pyproject.toml | cut -d' ' -f1)"
installed_project="" installed_extras=""
if [ -f "$stamp" ]; then read -r installed_project installed_extras < "$stamp" || true; fi
[ "$installed_project" = "$project" ] || installed_extras=""
wanted="$installed_extras"
for extra in ${extras//,/ }; do
  case ",$wanted," in *",$extra,"*) ;; *) wanted="${wanted:+$wanted,}$extra" ;; esac
done
if [ "$installed_project" != "$project" ] || [ "$wanted" != "$installed_extras" ]; then
  # torch is pinned to 2.13.0 in the train extra; see README ("Installing") for other platforms.
  python -m pip install --quiet --disable-pip-version-check -e ".[${wanted}]"
  echo "$project $wanted" > "$stamp"
fi
