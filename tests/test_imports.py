"""The runtime half (preprocessing, scoring, metadata, metrics, runtime, engine building, the CLI) must
import without torch."""

import subprocess
import sys

CODE = """
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
import stmae_edge, stmae_edge.preprocessing, stmae_edge.scoring, stmae_edge.metadata, stmae_edge.evaluation.metrics
import stmae_edge.errors, stmae_edge.data
import stmae_edge.runtime, stmae_edge.runtime.bench, stmae_edge.runtime.files, stmae_edge.runtime.overlay
import stmae_edge.runtime.linescan
import stmae_edge.runtime.tensorrt_backend, stmae_edge.engine_plan, stmae_edge.engines.build, stmae_edge.cli
import numpy as np
x = stmae_edge.preprocessing.Preprocessing()(np.zeros((10, 10), np.uint8))
assert x.shape == (1, 3, 256, 256)
print('ok')
"""


def test_runtime_modules_import_without_torch():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
