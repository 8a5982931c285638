#!/usr/bin/env bash
# GPU acceptance (issue 14): every GPU path against ONNX Runtime on the CPU, then bench JSON; see
# scripts/gpu_acceptance.py. Uses .venv where there is one, else the machine's python3 with what it
# has (the lent GPU machines have torch, onnx, onnxruntime, OpenCV and typer; no network: prepare the
# models here with --prepare DIR and run there with --prepared DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
# -k: a process that ignores the TERM is killed 10 s later (a hung CUDA call can)
exec timeout -k 10 540 "$python" scripts/gpu_acceptance.py "$@"
