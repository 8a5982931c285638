"""Bad input never crashes the host program: each case raises its typed error with a message that
says what was wrong, and the same detector then still scores a good image exactly as before."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import require_tensorrt

from stmae_edge.engines.build import build_engine
from stmae_edge.errors import BackendError, CheckpointError, EngineMismatchError, InvalidImageError, StmaeError
from stmae_edge.model_files import read_metadata
from stmae_edge.runtime import Detector
from stmae_edge.runtime.devices import cuda_device_count


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares a huge image."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, synthetic_dataset):
    folder = tmp_path_factory.mktemp("bad_inputs")
    good_png = (synthetic_dataset / "test" / "good" / "000.png").read_bytes()
    ok, jpeg = cv2.imencode(".jpg", np.full((64, 64), 128, np.uint8))
    files = {
        "truncated.png": good_png[: len(good_png) // 3],
        "truncated.jpg": jpeg.tobytes()[:200],
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "not_an_image.png": b"%PDF-1.7 this is a document",
        "empty.png": b"",
        "huge.png": _png_declaring(100_000, 100_000),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files} | {"missing.png": folder / "missing.png"}


BAD_ARRAYS = {
    "empty array": (np.zeros((0, 0), np.uint8), "expected an image"),
    "zero-width": (np.zeros((10, 0, 3), np.uint8), "expected an image"),
    "two channels": (np.zeros((32, 32, 2), np.uint8), "2 channels"),
    "five channels": (np.zeros((32, 32, 5), np.uint8), "5 channels"),
    "1-d": (np.zeros(100, np.uint8), "expected an image"),
    "NaN": (np.full((32, 32), np.nan, np.float32), "NaN"),
    "infinite": (np.full((32, 32, 3), np.inf, np.float64), "NaN or infinite"),
    "int64 pixels": (np.zeros((32, 32), np.int64), "pixel type"),
    "far too large": (np.zeros((8193, 8193), np.uint8), "exceeds the limit"),
}


def test_every_bad_input_gives_its_typed_error_and_the_detector_stays_usable(tiny_export, bad_files):
    detector = Detector(tiny_export[1])
    good = np.random.default_rng(0).integers(0, 256, (80, 100), np.uint8)
    before = detector.predict(good)
    messages = {}
    for name, path in bad_files.items():
        with pytest.raises(InvalidImageError) as error:
            detector.predict(path)
        messages[name] = str(error.value)
        assert str(path) in messages[name]
        after = detector.predict(good)
        assert after.score == before.score and np.array_equal(after.anomaly_map, before.anomaly_map)
    for array, fragment in BAD_ARRAYS.values():
        with pytest.raises(InvalidImageError, match=fragment):
            detector.predict(array)
        # in a list, the error names which image, and nothing of the list is returned half-done
        with pytest.raises(InvalidImageError, match=r"image 1: "):
            detector.predict([good, array])
        assert detector.predict(good).score == before.score
    assert "no such image file" in messages["missing.png"] and "an empty file (0 bytes)" in messages["empty.png"]
    assert "exceeds the limit" in messages["huge.png"]
    for name in ("truncated.png", "truncated.jpg", "corrupt.png"):
        assert "corrupt" in messages[name], messages[name]
    assert "not a PNG, JPEG, BMP or TIFF file" in messages["not_an_image.png"]
    assert all(isinstance(e, str) and "\n" not in e for e in messages.values())


@pytest.fixture(scope="module")
def plans(tiny_export, tmp_path_factory):
    """Two real plans of the same model with different profiles (so different bytes), with sidecars."""
    require_tensorrt()
    folder = tmp_path_factory.mktemp("plans")
    a, _ = build_engine(tiny_export[1], None, "1:4:8", folder / "a.plan", timing_cache=folder / "t.cache")
    b, _ = build_engine(tiny_export[1], None, "1:1:2", folder / "b.plan", timing_cache=folder / "t.cache")
    assert a.read_bytes() != b.read_bytes()
    return a, b


def _copy_plan(plan, folder, name):
    shutil.copy(plan, folder / name)
    shutil.copy(plan.with_name(plan.name + ".json"), folder / (name + ".json"))
    return folder / name


def test_plan_runs_where_there_is_a_gpu_and_says_why_not_where_there_is_none(plans, tiny_export):
    if cuda_device_count() == 0:
        # said as what it is, not as cuda-python's "insufficient driver", and not with --backend ort-cpu,
        # which a plan does not run with
        with pytest.raises(BackendError, match=r"no NVIDIA GPU here .* run the .onnx file it was built from"):
            Detector(plans[0])
        return
    image = np.random.default_rng(0).integers(0, 256, (80, 100), np.uint8)
    for cuda_graph in (False, True):
        on_gpu = Detector(plans[0], cuda_graph=cuda_graph)
        assert on_gpu.info["backend"] == "tensorrt" and on_gpu.info["batch"] == [1, 8]
        expected = Detector(tiny_export[1], "ort-cpu").predict([image] * 5)
        got = on_gpu.predict([image] * 5)
        np.testing.assert_allclose([r.score for r in got], [r.score for r in expected], rtol=1e-3)


def test_an_engine_whose_sidecar_does_not_match_is_refused(plans, tmp_path):
    a, b = plans
    swapped = _copy_plan(a, tmp_path, "swapped.plan")
    shutil.copy(b.with_name(b.name + ".json"), tmp_path / "swapped.plan.json")
    with pytest.raises(EngineMismatchError, match="does not match its sidecar"):
        Detector(swapped)

    tampered = _copy_plan(a, tmp_path, "tampered.plan")
    with open(tampered, "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineMismatchError, match="sha256 differs"):
        Detector(tampered)

    other_version = _copy_plan(a, tmp_path, "version.plan")
    sidecar = json.loads((tmp_path / "version.plan.json").read_text())
    sidecar["tensorrt"]["version"] = "9.0.0"
    (tmp_path / "version.plan.json").write_text(json.dumps(sidecar))
    with pytest.raises(EngineMismatchError, match="built with .* 9.0.0 .*rebuild"):
        Detector(other_version)

    # the sidecar is not covered by the plan's hash: its batch profile is checked as the rest is
    for batch in (None, {"min": 1, "opt": 8}, {"min": 4, "opt": 2, "max": 8}, {"min": 1, "opt": 8, "max": "8"}):
        odd = _copy_plan(a, tmp_path, "batch.plan")
        sidecar = json.loads((tmp_path / "batch.plan.json").read_text())
        sidecar["batch"] = batch
        (tmp_path / "batch.plan.json").write_text(json.dumps(sidecar))
        with pytest.raises(EngineMismatchError, match="no batch profile .*rebuild the engine"):
            Detector(odd)

    # the metadata in the sidecar carries the model file's metadata digest: a hand edit is refused
    edited = _copy_plan(a, tmp_path, "edited.plan")
    sidecar = json.loads((tmp_path / "edited.plan.json").read_text())
    sidecar["metadata"]["preprocessing"]["mean"] = [0.0, 0.0, 0.0]
    (tmp_path / "edited.plan.json").write_text(json.dumps(sidecar))
    with pytest.raises(EngineMismatchError, match="metadata was changed after training"):
        read_metadata(edited)
    with pytest.raises(EngineMismatchError, match="metadata was changed after training"):
        Detector(edited)

    lonely = tmp_path / "lonely.plan"
    shutil.copy(a, lonely)
    with pytest.raises(EngineMismatchError, match="sidecar lonely.plan.json is missing"):
        Detector(lonely)
    (tmp_path / "lonely.plan.json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="sidecar .*lonely.plan.json is not valid JSON"):
        Detector(lonely)


def test_model_file_errors_are_typed(tiny_export, tmp_path):
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"garbage")
    for path, fragment in ((tmp_path / "absent.onnx", "no such model file"), (not_onnx, "not a readable ONNX file"),
                           (tiny_export[0].with_suffix(".txt"), "no such model file")):
        with pytest.raises(StmaeError, match=fragment) as caught:
            Detector(path)
        if fragment == "no such model file":  # the checkpoint reader's kind too (one kind wherever it is opened)
            assert isinstance(caught.value, BackendError) and isinstance(caught.value, CheckpointError)
    text = tmp_path / "model.bin"
    text.write_bytes(b"x")
    with pytest.raises(StmaeError, match="unknown model file type"):
        Detector(text)
    folder = tmp_path / "model.onnx"  # a folder named like a model: "no such model file" misled
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"model.onnx is a folder; give the model file in it"):
        Detector(folder)


TORCH_FREE = """
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
import numpy as np
from stmae_edge.runtime import Detector
from stmae_edge.errors import InvalidImageError
d = Detector(sys.argv[1])
r = d.predict(np.random.default_rng(0).integers(0, 256, (80, 100), np.uint8))
rs = d.predict([np.zeros((70, 90, 3), np.uint8), np.ones((64, 64), np.uint16)])
try:
    d.predict(np.zeros((5, 5, 2), np.uint8))
except InvalidImageError:
    pass
assert d.predict(np.random.default_rng(0).integers(0, 256, (80, 100), np.uint8)).score == r.score
assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}
print(d.info['backend'], r.image_size, len(rs))
"""


def test_the_runtime_runs_a_detector_with_torch_unimportable(tiny_export):
    result = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tiny_export[1])], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] in ("ort-cpu", "ort-cuda") and "(80, 100) 2" in result.stdout


def test_one_table_of_backends_drives_choice_errors_and_help(tiny_export, caplog):
    from stmae_edge.cli import BACKEND_HELP
    from stmae_edge.errors import ConfigError
    from stmae_edge.runtime.backend_table import AUTO, BACKEND_KINDS, BACKENDS, FILE_KINDS, backend_help
    from stmae_edge.runtime.backends import ORT_PROVIDERS, choose_backend

    assert BACKENDS == ("auto", *(kind.name for kind in BACKEND_KINDS)) and BACKEND_HELP == backend_help()
    assert all(kind.name in BACKEND_HELP for kind in BACKEND_KINDS) and set(AUTO) == set(FILE_KINDS)
    for file_kind, (suffixes, description, other) in FILE_KINDS.items():
        runs = [kind.name for kind in BACKEND_KINDS if kind.file_kind == file_kind]
        model = tiny_export[0].with_suffix(suffixes[0])
        # auto: the last of AUTO's list runs on any machine; the GPU ones only where there is a GPU
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="stmae_edge.runtime.backends"):
            chosen = choose_backend(model, "auto")
        assert chosen in AUTO[file_kind] and chosen in runs
        if cuda_device_count() == 0:
            assert chosen == AUTO[file_kind][-1]
        if chosen != AUTO[file_kind][0]:  # a GPU backend passed over is said, not silent
            assert f"backend auto: {chosen} for {model.name} ({AUTO[file_kind][0]}" in caplog.text
        for kind in BACKEND_KINDS:
            if kind.file_kind == file_kind:
                assert choose_backend(model, kind.name) == kind.name
            else:  # names the backends that can run it, and how to get a file for the others
                with pytest.raises(ConfigError, match=f"is {description}; it runs with --backend "
                                                      f"{' or '.join(runs)} \\(or auto\\); for --backend {kind.name}, "
                                                      f"{re.escape(other[kind.file_kind])}"):
                    choose_backend(model, kind.name)
    with pytest.raises(ConfigError, match="unknown model file type '.bin'; give a TensorRT plan"):
        choose_backend(tiny_export[0].with_suffix(".bin"), "auto")
    # The words a user reads, spelled out once: the help and a refusal.
    assert "ort-tensorrt, ort-cuda, ort-cpu (.onnx); torch-cpu, torch-cuda (.pt); or auto" in BACKEND_HELP
    assert ORT_PROVIDERS == {"ort-tensorrt": "TensorrtExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                             "ort-cpu": "CPUExecutionProvider"}
    with pytest.raises(ConfigError) as refused:
        choose_backend(tiny_export[0], "ort-cpu")
    assert str(refused.value).endswith(" is a PyTorch checkpoint; it runs with --backend torch-cpu or torch-cuda (or "
                                       "auto); for --backend ort-cpu, export it with `stmae-edge export`")
    # Through the Detector, as a user meets it: the ONNX file asked to run in PyTorch (the way to a file
    # for PyTorch was left out: only tensorrt's was given)
    with pytest.raises(ConfigError, match="is an ONNX file; it runs with --backend ort-tensorrt or ort-cuda or ort-cpu "
                                          r"\(or auto\); for --backend torch-cpu, run the .pt checkpoint it was exported from"):
        Detector(tiny_export[1], "torch-cpu")


def test_a_library_exception_is_quoted_in_one_line_even_without_text():
    from stmae_edge.errors import first_line

    assert first_line(RuntimeError()) == "RuntimeError"  # was an IndexError where a message was empty
    assert first_line(ValueError("  first\nsecond")) == "first"
    assert len(first_line(ValueError("x" * 500))) == 300 and len(first_line(ValueError("x" * 500), 200)) == 200
    # ONNX Runtime's own location and function came first and filled the line before the reason
    native = RuntimeError("/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void onnxruntime::"
                          "python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const ProviderOptions&) "
                          "Please install TensorRT libraries as mentioned in the GPU requirements page\nmore")
    assert first_line(native) == "Please install TensorRT libraries as mentioned in the GPU requirements page"
    assert first_line(RuntimeError("/x/y.cc:12 it failed")) == "it failed"
    assert first_line(RuntimeError("a.cc:12")) == "a.cc:12"  # nothing after it: kept
    # Windows builds name the function without its arguments; the reason's own brackets stay
    assert first_line(RuntimeError("D:\\a\\_work\\1\\s\\onnxruntime\\python\\onnxruntime_pybind_state.cc:743 "
                                   "onnxruntime::python::CreateExecutionProviderInstance CUDA_PATH is set but CUDA "
                                   "wasn't able to be loaded")) == "CUDA_PATH is set but CUDA wasn't able to be loaded"
    assert first_line(RuntimeError("C:\\s\\op_kernel.cc:83 onnxruntime::OpKernelContext::OutputMLValue status.IsOK() "
                                   "was false. Shape mismatch")) == "status.IsOK() was false. Shape mismatch"
    assert first_line(RuntimeError("/src/a.h:5 T onnxruntime::f(int) const [with T = float] the reason")) == "the reason"
    assert first_line(RuntimeError("file.cpp:5 error in f() here")) == "error in f() here"  # no a::b: text kept


@pytest.mark.parametrize("platform_name, pin", [("jetson", '"cuda-python>=12.6,<12.7"'),
                                                ("x86-64", 'cuda-python ("cuda-python>=12.6,<13" on a CUDA 12 driver)')])
def test_missing_cuda_python_names_the_one_this_machine_needs(monkeypatch, platform_name, pin):
    """`pip install cuda-python` takes 13, which JetPack 6's CUDA 12 driver cannot run: the hint said it."""
    from stmae_edge.runtime import tensorrt_backend

    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails, as where it is not installed
    monkeypatch.setattr(tensorrt_backend, "nvidia_platform", lambda: platform_name)
    with pytest.raises(BackendError, match=re.escape(f'pip install "stmae-edge[gpu]" (or pip install {pin})')):
        tensorrt_backend._import_cudart()
    assert set(tensorrt_backend.CUDA_PYTHON_FOR) == {"jetson", "x86-64", "arm", "macos", "other"}


@pytest.mark.skipif(sys.platform == "win32", reason="Windows adds the folder to the DLL search path instead")
def test_tensorrt_libraries_of_pips_wheel_are_loaded_for_onnx_runtimes_tensorrt_provider(tmp_path, monkeypatch, caplog):
    """ONNX Runtime's TensorRT provider opens libnvinfer.so.10 by name, which in a virtual environment
    with pip's TensorRT is in site-packages/tensorrt_libs, on no loader path: the session failed to
    start. (Here the wheel is played by a folder of stand-in files; the loads are recorded.)"""
    import ctypes

    from stmae_edge import onnx_files

    package = tmp_path / "site" / "tensorrt_libs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("libnvinfer.so.10", "libnvonnxparser.so.10", "libnvinfer_builder_resource.so.10.9.0"):
        (package / name).write_bytes(b"not really a library")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(onnx_files, "_tensorrt_preloaded", False)
    with caplog.at_level("INFO", logger="stmae_edge.onnx_files"):
        onnx_files.preload_tensorrt_libraries()  # the stand-ins do not load: said at info, no exception
    assert "libnvinfer.so.10: not loaded" in caplog.text
    loaded = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0: loaded.append((path.rpartition("/")[2], mode)))
    onnx_files.preload_tensorrt_libraries()
    assert loaded == []  # once per process: every Detector after the first finds them loaded
    monkeypatch.setattr(onnx_files, "_tensorrt_preloaded", False)
    onnx_files.preload_tensorrt_libraries()
    assert loaded == [("libnvinfer.so.10", ctypes.RTLD_GLOBAL), ("libnvonnxparser.so.10", ctypes.RTLD_GLOBAL)]


@pytest.mark.parametrize("precision, override, warned", [("fp32", None, True), ("fp32", "0", False),
                                                         ("fp16", None, False)])
def test_onnx_runtimes_tensorrt_provider_on_a_float32_graph_warns_of_tf32(tmp_path, monkeypatch, caplog, precision,
                                                                         override, warned):
    """TensorRT multiplies float32 in TF32 unless told otherwise, and ONNX Runtime's TensorRT provider has
    no option for it (its CUDA provider has use_tf32): a float32 graph's maps were fp16-precise there
    without a word. Only NVIDIA_TF32_OVERRIDE=0 turns it off."""
    from types import SimpleNamespace

    from stmae_edge.runtime import backends

    if override is None:
        monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    else:
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", override)
    (tmp_path / "m.onnx").write_bytes(b"a graph")
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.backends"):
        providers = backends._gpu_providers(SimpleNamespace(), "TensorrtExecutionProvider", tmp_path / "m.onnx",
                                            (precision, (3, 64, 64)))
    assert providers[0][0] == "TensorrtExecutionProvider" and providers[1][1] == {"use_tf32": "0"}
    assert ("NVIDIA_TF32_OVERRIDE=0" in caplog.text) == warned


def test_the_first_tensorrt_provider_session_says_it_builds_engines_and_where(tmp_path, caplog):
    """Its first session builds engines for minutes before the first image, into a folder beside the
    model: said once, not on the runs that load them."""
    from types import SimpleNamespace

    from stmae_edge.runtime import backends

    def providers():
        caplog.clear()
        with caplog.at_level("WARNING", logger="stmae_edge.runtime.backends"):
            return backends._gpu_providers(SimpleNamespace(), "TensorrtExecutionProvider", tmp_path / "m.onnx",
                                           ("fp16", (3, 64, 64)))

    (tmp_path / "m.onnx").write_bytes(b"a graph")
    cache = Path(providers()[0][1]["trt_engine_cache_path"])
    assert f"builds this model's engines into {cache} before its first image" in caplog.text
    (cache / "m_fp16.engine").write_bytes(b"an engine")  # what that session wrote
    assert Path(providers()[0][1]["trt_engine_cache_path"]) == cache
    assert "builds this model's engines" not in caplog.text and "not used" not in caplog.text


def test_a_model_exported_again_under_the_same_name_gets_engines_of_its_own(tmp_path, caplog, monkeypatch):
    """ONNX Runtime's TensorRT provider names its cached engines by the model's path alone
    (GenerateMetaDefId): a model trained and exported again to the same file ran on the engines built
    for the one before, with its weights, without a word."""
    from types import SimpleNamespace

    from stmae_edge.runtime import backends

    model = tmp_path / "m.onnx"
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)

    def cache_folder():
        caplog.clear()
        with caplog.at_level("WARNING", logger="stmae_edge.runtime.backends"):
            return Path(backends._gpu_providers(SimpleNamespace(), "TensorrtExecutionProvider", model,
                                                ("fp16", (3, 64, 64)))[0][1]["trt_engine_cache_path"])

    model.write_bytes(b"the first export")
    first = cache_folder()
    (first / "m_fp16.engine").write_bytes(b"its engine")
    model.write_bytes(b"the second export")
    second = cache_folder()
    assert second != first and second.parent == first.parent and not any(second.iterdir())
    assert f"the engine caches of other exports to this name ({first.name}) are not used" in caplog.text
    model.write_bytes(b"the first export")  # the same bytes again: the same engines
    assert cache_folder() == first and "builds this model's engines" not in caplog.text
    # engines built with TF32 turned off as TF32_NOTE advises are not those built before it was (which
    # are this export's all the same: not named for removal)
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    assert cache_folder() == first.with_name(first.name + "-tf32off")
    assert f"other exports to this name ({second.name}) are not used" in caplog.text


def test_onnx_runtime_is_given_the_graph_itself_where_it_may_not_open_its_path(tiny_export, tmp_path, monkeypatch,
                                                                              synthetic_dataset):
    """ONNX Runtime on Windows, before its 2026 fixes, failed to start a session on a model in a folder
    named outside the ANSI code page (検査): there the session gets the graph's bytes, here as there."""
    import onnxruntime as ort

    from stmae_edge import onnx_files
    from stmae_edge.engines.verify import verify

    folder = tmp_path / "検査"
    folder.mkdir()
    model = folder / "model.onnx"
    shutil.copyfile(tiny_export[1], model)
    given = []
    real = ort.InferenceSession

    def recording(source, *args, **kwargs):
        given.append(type(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    reads = []
    required = onnx_files.require_model_file

    def counted(path, *args, **kwargs):  # every read of a graph goes through it
        reads.append(Path(path))
        return required(path, *args, **kwargs)

    monkeypatch.setattr(onnx_files, "require_model_file", counted)
    images = sorted((synthetic_dataset / "test" / "good").iterdir())[:2]
    reads_of = {}
    for paths_in_ansi, kind in ((False, str), (True, bytes)):
        monkeypatch.setattr(onnx_files, "PATHS_IN_ANSI", paths_in_ansi)
        given.clear()
        reads.clear()
        with Detector(model, "ort-cpu") as detector:
            scores = [r.score for r in detector.predict(images)]
        reads_of[paths_in_ansi] = reads.count(model)
        with Detector(tiny_export[1], "ort-cpu") as detector:  # an ASCII path is given as it is
            assert [r.score for r in detector.predict(images)] == scores
        verify(model, tiny_export[0], images=images)
        assert given == [kind, str, kind], (paths_in_ansi, given)
    # the graph given as bytes is the graph checked: one read, no more than where the path is given
    assert reads_of[True] == reads_of[False], reads_of


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot lock a folder: the sessions are not kept apart there")
def test_tensorrt_provider_sessions_build_their_engines_one_process_at_a_time(tiny_export, tmp_path, monkeypatch):
    """The provider builds its engines as the session starts and writes them without a temporary name:
    two processes starting at once (one per camera) built them twice, and one could read the other's
    half-written engine. The cache folder is held while a session starts; an engine a stopped run left
    half-written is named in the error, with what to do."""
    import contextlib
    import fcntl
    import hashlib

    import onnxruntime as ort

    from stmae_edge.runtime import backends

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT provider to ask for (onnxruntime-gpu has, GPU or not)")
    model = tmp_path / "m.onnx"
    shutil.copyfile(tiny_export[1], model)
    original = model.read_bytes()
    seen = []
    waited_for = backends.folder_waited_for

    @contextlib.contextmanager
    def exported_again_meanwhile(folder, waiting):  # another model exported to the name while this one waits
        with waited_for(folder, waiting):
            model.write_bytes(b"another model's graph")
            yield

    monkeypatch.setattr(backends, "folder_waited_for", exported_again_meanwhile)

    def starting(source, options, providers, **kwargs):  # the provider's start, where the engines are built
        cache = Path(providers[0][1]["trt_engine_cache_path"])
        # the graph whose digest names the engine cache, not what lies under the name by now
        assert source == original and hashlib.sha256(source).hexdigest()[:12] in cache.name
        probe = os.open(cache, os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("free")
        except BlockingIOError:
            seen.append("held")
        finally:
            os.close(probe)
        (cache / "TensorrtExecutionProvider_TRTKernel_graph_main_0_0.engine").write_bytes(b"half an eng")
        raise RuntimeError("TensorRT EP could not deserialize engine from cache")

    monkeypatch.setattr(ort, "InferenceSession", starting)
    with pytest.raises(BackendError) as failure:
        backends.OnnxRuntimeBackend(model, "ort-tensorrt")
    assert seen == ["held"]
    cache = next(tmp_path.glob("m.ort-tensorrt-cache-*"))
    assert str(failure.value).endswith(f"; if a run was stopped while it built engines, remove {cache} and try again")


def test_a_plan_read_while_build_replaces_it_and_its_sidecar_is_read_again(tiny_export, tmp_path, monkeypatch):
    """`build` renames the new plan, then its sidecar: a Detector or server opening the plan between the
    two read the old sidecar and the new plan, and said they were another model's pair, rebuild both."""
    import hashlib

    from stmae_edge import engine_plan
    from stmae_edge.metadata import ModelMetadata

    metadata = ModelMetadata.from_onnx(tiny_export[1]).to_dict()

    def pair(plan_bytes: bytes) -> tuple[bytes, bytes]:
        return plan_bytes, engine_plan.sidecar_bytes({
            "format": engine_plan.SIDECAR_FORMAT, "metadata": metadata, "precision": "fp16",
            "plan": {"sha256": hashlib.sha256(plan_bytes).hexdigest(), "size_bytes": len(plan_bytes)},
            "batch": {"min": 1, "opt": 8, "max": 32}, "tensorrt": {"flavour": "tensorrt", "version": "10.0"}})

    plan = tmp_path / "m.plan"
    side = engine_plan.sidecar_path(plan)
    old, new = pair(b"the plan built before"), pair(b"the plan built now")
    plan.write_bytes(old[0])
    side.write_bytes(old[1])
    read, built = Path.read_bytes, []

    def built_meanwhile(self):
        if self == plan and not built:  # the build's renames, after the sidecar was read, before the plan
            built.append(True)
            plan.write_bytes(new[0])
            side.write_bytes(new[1])
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", built_meanwhile)
    data, sidecar, _ = engine_plan.read_plan(plan)
    assert data == new[0] and engine_plan.sidecar_bytes(sidecar) == new[1]
