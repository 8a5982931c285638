#!/usr/bin/env bash
# Creates .venv (once) and installs stmae-edge with the given extras into it. Sourced by the others.
# Installs only when pyproject.toml changed or an extra is asked for that .venv does not have yet, so
# the demo (train,demo) and the tests (more extras) share one .venv without reinstalling in turn.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-train,dev}"
too_old() { ! "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
# python.org's Windows installer gives `python` and `py`, and Git Bash's `python3` is the Store's stub
python="${STMAE_PYTHON:-python3}"  # another interpreter: STMAE_PYTHON=python3.12
if [ -z "${STMAE_PYTHON:-}" ] && too_old python3 && ! too_old python; then python=python; fi
# a venv keeps its interpreter in bin/, or in Scripts/ on Windows
venv_python() { if [ -e .venv/Scripts/python.exe ]; then echo .venv/Scripts/python.exe; else echo .venv/bin/python; fi; }
if [ -x "$(venv_python)" ] && too_old "$(venv_python)"; then
  # a macOS /usr/bin/python3 is 3.9: the install would fail the same way on every run
  echo "error: .venv was made with Python $("$(venv_python)" -c 'import platform; print(platform.python_version())'), and stmae-edge needs 3.10+: remove .venv and run again, with STMAE_PYTHON=python3.12 (say) if python3 is older" >&2
  exit 2
fi
if [ ! -x "$(venv_python)" ]; then
  if too_old "$python"; then
    echo "error: $python is not Python 3.10 or later; install one and run again with STMAE_PYTHON=python3.12 (say)" >&2
    exit 2
  fi
  # On a Jetson, JetPack installs TensorRT for the system Python only: the venv must see its packages
  system_site=""
  if [ -e /etc/nv_tegra_release ] || uname -r | grep -q tegra; then system_site="--system-site-packages"; fi
  "$python" -m venv $system_site .venv || { echo "error: '$python -m venv' failed; install Python 3.10+ with venv (Debian, Ubuntu, JetPack: sudo apt install python3-venv)" >&2; exit 2; }
fi
if [ -e .venv/Scripts/activate ]; then . .venv/Scripts/activate; else . .venv/bin/activate; fi
stamp=".venv/.stmae-edge-installed"
# hashlib, not sha256sum, which macOS 13 and older lack
project="$(python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
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
