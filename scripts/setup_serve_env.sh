#!/usr/bin/env bash
# Creates .venv-serve (once) with stmae-edge and its serve extra (PyTriton, which needs numpy < 2, apart
# from .venv). Run by scripts/test.sh; or run it and then `.venv-serve/bin/stmae-edge serve MODEL`.
# Triton's Python backend links libpython: the venv is made from a Python that has a shared libpython
# (pyenv's, the system's /usr/bin/python3), and `serve` puts that library first for the backend.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$(uname -s)" != Linux ]; then
  # PyTriton's wheel carries a Linux Triton server; elsewhere there is nothing to install
  echo "note: serving (PyTriton's Triton server) runs on Linux only: no .venv-serve here; its tests skip" >&2
  exit 0
fi
python="${STMAE_SERVE_PYTHON:-python3}"
libpython="$("$python" -c 'import sysconfig, pathlib; d = sysconfig.get_config_var; l = pathlib.Path(d("LIBDIR") or ""); print(next((l / n for n in (d("INSTSONAME") or "", d("LDLIBRARY") or "") if ".so" in n and (l / n).is_file()), ""))')"
if [ -z "$libpython" ] && [ -x /usr/bin/python3 ]; then
  python=/usr/bin/python3  # this Python has no shared libpython; the system's does
fi
if [ ! -x .venv-serve/bin/python ]; then
  "$python" -m venv .venv-serve || { echo "error: '$python -m venv' failed; install Python 3.10+ with venv (Debian, Ubuntu, JetPack: sudo apt install python3-venv)" >&2; exit 2; }
fi
stamp=".venv-serve/.stmae-edge-installed"
want="$(.venv-serve/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())') serve"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv-serve/bin/python -m pip install --quiet --disable-pip-version-check -e ".[serve]"
  echo "$want" > "$stamp"
fi
