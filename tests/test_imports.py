"""The runtime half (preprocessing, scoring, metadata, metrics, runtime, serving, engine building, the
CLI) must import without torch: every module of runtime/ and serving/, found by walking them, but the
torch backend, which is opened only for a .pt file."""

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
import stmae_edge, stmae_edge.preprocessing, stmae_edge.scoring, stmae_edge.metadata, stmae_edge.evaluation.metrics
import stmae_edge.errors, stmae_edge.data, stmae_edge.wire_format
import stmae_edge.engine_plan, stmae_edge.engines.build, stmae_edge.cli
import stmae_edge.runtime, stmae_edge.serving
walked = []
for package in (stmae_edge.runtime, stmae_edge.serving):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
        if module.name != 'stmae_edge.runtime.torch_backend':
            importlib.import_module(module.name)
            walked.append(module.name)
assert {'stmae_edge.runtime.remote', 'stmae_edge.runtime.tensorrt_backend', 'stmae_edge.serving.server'} <= set(walked)
import numpy as np
x = stmae_edge.preprocessing.Preprocessing()(np.zeros((10, 10), np.uint8))
assert x.shape == (1, 3, 256, 256)
print('ok')
"""


def test_runtime_modules_import_without_torch():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
