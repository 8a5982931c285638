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
# every name an integrator imports from the runtime resolves (to the class defined where it is), torch-free
assert set(stmae_edge.runtime.__all__) == set(stmae_edge.runtime._EXPORTS)
for name in set(stmae_edge.runtime.__all__) - {'BACKENDS'}:
    assert getattr(stmae_edge.runtime, name).__name__ == name, name
from stmae_edge.runtime import StreamingInspector, Thresholds, InvalidImageError, StmaeError
assert issubclass(InvalidImageError, StmaeError) and Thresholds is stmae_edge.scoring.Thresholds
import numpy as np
x = stmae_edge.preprocessing.Preprocessing()(np.zeros((10, 10), np.uint8))
assert x.shape == (1, 3, 256, 256)
print('ok')
"""


def test_runtime_modules_import_without_torch():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


QUIET = """
import sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from stmae_edge.onnx_files import import_onnxruntime, quiet_onnxruntime_logs
if sys.argv[1] == 'quiet':
    quiet_onnxruntime_logs()
x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])
y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])
unused = numpy_helper.from_array(np.zeros(1, np.float32), 'unused')  # ONNX Runtime warns about it
graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'g', [x], [y], [unused])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=8)
import_onnxruntime().InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
"""


def test_quieted_onnxruntime_says_nothing_but_fatal_errors():
    def stderr(mode):
        result = subprocess.run([sys.executable, "-c", QUIET, mode], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert "Removing initializer 'unused'" in stderr("loud")  # the check can fail
    assert stderr("quiet") == ""


def test_onnxruntime_is_imported_only_through_import_onnxruntime():
    """So that the CLI's quieting reaches export, verify and calibrate as well as the runtime."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "stmae_edge"
    direct = []
    for path in package.rglob("*.py"):
        if path.name == "onnx_files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                # calibrate's quantisation tools come after its import_onnxruntime(), which quiets the log
                allowed = path.name == "calibrate.py" and name.startswith("onnxruntime.quantization")
                if (name == "onnxruntime" or name.startswith("onnxruntime.")) and not allowed:
                    direct.append(f"{path.name}:{node.lineno} {name}")
    assert not direct, direct


def test_runtime_leaves_opencv_image_cap_to_the_host():
    """The host's own OpenCV reads strips over our 64-Mpixel cap after importing the runtime; ours is
    checked on each file's header instead (test_image_files)."""
    code = ("import os, numpy as np; os.environ.pop('OPENCV_IO_MAX_IMAGE_PIXELS', None)\n"
            "import stmae_edge.runtime, cv2\n"
            "assert 'OPENCV_IO_MAX_IMAGE_PIXELS' not in os.environ\n"
            "ok, png = cv2.imencode('.png', np.zeros((9000, 8000), np.uint8))  # 72 Mpixels\n"
            "print(cv2.imdecode(png, cv2.IMREAD_GRAYSCALE).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "(9000, 8000)", result.stderr


def test_cuda_libraries_are_loaded_once_without_taking_the_hosts_stdout(monkeypatch, capsys, caplog):
    """ONNX Runtime's loader of CUDA libraries prints what it could not load. Each GPU Detector caught
    that by swapping sys.stdout, which diverted the host's other threads' output, and two Detectors
    opened at once could leave it swapped for good. Now it runs once per process, and only a program
    that asked for quiet (the CLI) has its output caught."""
    import logging
    import threading

    from stmae_edge import onnx_files

    calls, stdout_seen = [], []

    class Loader:  # onnxruntime's module as preload_cuda_libraries uses it
        @staticmethod
        def preload_dlls(directory=None):
            calls.append(directory)
            stdout_seen.append(sys.stdout)
            print("Failed to load libcudnn.so.9")

    host_stdout = sys.stdout
    monkeypatch.setattr(onnx_files, "_preloaded", False)
    monkeypatch.setattr(onnx_files, "_catch_loader_output", False)
    threads = [threading.Thread(target=onnx_files.preload_cuda_libraries, args=(Loader,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [""] and stdout_seen == [host_stdout] and sys.stdout is host_stdout
    assert "Failed to load" in capsys.readouterr().out  # a host that did not ask for quiet sees it

    monkeypatch.setattr(onnx_files, "_preloaded", False)
    onnx_files.catch_cuda_loader_output()  # the CLI's choice, with -v too (its --json is stdout)
    with caplog.at_level(logging.INFO, logger="stmae_edge.onnx_files"):
        onnx_files.preload_cuda_libraries(Loader)
    assert capsys.readouterr().out == "" and "Failed to load libcudnn.so.9" in caplog.text
    assert sys.stdout is host_stdout


def test_a_broken_or_doubled_onnxruntime_install_is_said_in_one_line(monkeypatch, caplog):
    """With onnxruntime and onnxruntime-gpu both installed (pip adds the one beside the other without a
    word), removing one leaves an empty package: every command died with an AttributeError traceback.
    Both installed at once is warned of, once per process."""
    import types
    from importlib import metadata

    import pytest

    from stmae_edge import onnx_files
    from stmae_edge.errors import BackendError

    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))  # what is left of it
    with pytest.raises(BackendError, match="ONNX Runtime's installation is broken .*pip uninstall -y onnxruntime "
                                           "onnxruntime-gpu"):
        onnx_files.import_onnxruntime()
    monkeypatch.undo()
    monkeypatch.setattr(onnx_files, "_checked_distributions", False)
    monkeypatch.setattr(metadata, "version", lambda name: {"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.23.2"}[name])
    with caplog.at_level("WARNING", logger="stmae_edge.onnx_files"):
        onnx_files.import_onnxruntime()
        onnx_files.import_onnxruntime()
    assert [r.getMessage()[:78] for r in caplog.records] == [
        "both ONNX Runtime builds are installed (onnxruntime 1.22.0 and onnxruntime-gpu"]


def test_evaluating_an_onnx_file_does_not_import_torch(tiny_export, synthetic_dataset, tmp_path):
    """torch was imported to set its threads for every evaluate, 1 to 2 s of a run that never uses it."""
    code = ("import sys\nfrom stmae_edge.cli import main\n"
            f"sys.argv = ['stmae-edge', 'evaluate', {str(tiny_export[1])!r}, {str(synthetic_dataset)!r}, "
            f"'--out', {str(tmp_path / 'e.json')!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
