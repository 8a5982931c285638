"""Real TensorRT(-RTX) engine builds of exported graphs: no mocks of the builder or the parser."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import onnx
import pytest
from conftest import needs_tensorrt
from onnx import TensorProto, helper

from stmae_edge.engines.build import BatchRange, build_engine
from stmae_edge.errors import ConfigError, ExportError
from stmae_edge.metadata import ONNX_METADATA_KEY, ModelMetadata
from stmae_edge.outputs import sha256_file


@pytest.fixture(scope="module")
def onnx_file(tiny_export):
    return tiny_export[1]


@needs_tensorrt
def test_fp32_engine_builds_with_a_sidecar(onnx_file, tmp_path):
    plan, sidecar = build_engine(onnx_file, "fp32", "1:8:32", tmp_path / "m.fp32.plan")
    assert plan.stat().st_size > 100_000
    on_disk = json.loads((tmp_path / "m.fp32.plan.json").read_text())
    assert on_disk == json.loads(json.dumps(sidecar))
    assert on_disk["plan"]["sha256"] == sha256_file(plan)
    assert on_disk["onnx"]["sha256"] == sha256_file(onnx_file)
    assert on_disk["batch"] == {"min": 1, "opt": 8, "max": 32}
    assert on_disk["metadata"] == ModelMetadata.from_onnx(onnx_file).to_dict()
    assert on_disk["tensorrt"]["flavour"] in ("tensorrt", "tensorrt-rtx") and on_disk["tensorrt"]["version"]
    # full TensorRT keeps a timing cache beside the plan; TensorRT for RTX has none to keep
    cache = tmp_path / "timing.cache"
    assert (cache.is_file() and cache.stat().st_size > 0) == (on_disk["tensorrt"]["flavour"] == "tensorrt")


@needs_tensorrt
def test_a_graph_in_a_folder_named_outside_ascii_builds_with_or_without_external_data(onnx_file, tmp_path):
    """TensorRT's parser is handed the graph's bytes: its parse_from_file opens a narrow path, which
    Windows reads in its code page (a folder named after a user with an umlaut failed there). A graph
    whose tensors keep their data beside it still gets its path, where the parser looks for that data."""
    folder = tmp_path / "J\u00fcrgen \u5de5\u5834"
    folder.mkdir()
    inline = folder / "inline.onnx"
    inline.write_bytes(onnx_file.read_bytes())
    build_engine(inline, "fp32", "1:1:2", folder / "inline.plan")
    beside = folder / "beside.onnx"
    onnx.save_model(onnx.load(str(onnx_file)), str(beside), save_as_external_data=True, location="beside.data",
                    size_threshold=1024)
    assert (folder / "beside.data").stat().st_size > 100_000
    plan, sidecar = build_engine(beside, "fp32", "1:1:2", folder / "beside.plan")
    assert plan.stat().st_size > 100_000 and sidecar["onnx"]["sha256"] == sha256_file(beside)


@needs_tensorrt
def test_builds_keep_float32_from_tf32():
    from stmae_edge.engine_plan import import_tensorrt
    from stmae_edge.engines.build import keep_float32

    trt, _ = import_tensorrt()
    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    assert config.get_flag(trt.BuilderFlag.TF32)  # TensorRT's default: the check can fail
    keep_float32(trt, config)
    assert not config.get_flag(trt.BuilderFlag.TF32)


def test_the_error_that_says_what_went_wrong_comes_before_driver_noise():
    from stmae_edge.engine_plan import telling_error

    noise = "cudaError 35: CUDA driver version is insufficient"
    assert telling_error([noise, "Serialization assertion failed: magic tag mismatch", noise]).startswith("Serialization")
    assert telling_error([noise]) == noise and telling_error([]) == "no message"


@needs_tensorrt
def test_a_build_calls_no_deprecated_tensorrt_api(onnx_file, tmp_path, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        _, sidecar = build_engine(onnx_file, None, "1:1:2", tmp_path / "m.plan", timing_cache=tmp_path / "t.cache")
    ignored = [r.getMessage() for r in caplog.records if "has no timing cache" in r.getMessage()]
    if sidecar["tensorrt"]["flavour"] == "tensorrt":
        assert (tmp_path / "t.cache").is_file() and not ignored
    else:  # the cache asked for is not written, and the log says why
        assert not (tmp_path / "t.cache").exists()
        assert ignored == [f"{tmp_path / 't.cache'}: not used; tensorrt-rtx has no timing cache"]


@needs_tensorrt
def test_parser_errors_name_the_node_and_op(onnx_file, tmp_path):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["images"], ["score"], name="mystery_node",
                                                domain="com.example")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    helper.set_model_props(model, {ONNX_METADATA_KEY: ModelMetadata.from_onnx(onnx_file).to_json()})
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ExportError, match=r"mystery_node.*NoSuchOp"):
        build_engine(bad, "fp32", "1:1:2", tmp_path / "bad.plan")


def test_precision_and_batch_range_are_checked(onnx_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown precision"):
        build_engine(onnx_file, "int4", "1:8:32", tmp_path / "x.plan")
    for text in ("8:1:32", "0:1:2", "1:8", "a:b:c", "1:8:5000"):
        with pytest.raises(ConfigError):
            BatchRange.parse(text)


def test_missing_tensorrt_is_one_clear_line(onnx_file, tmp_path):
    code = ("import sys; sys.modules['tensorrt'] = sys.modules['tensorrt_rtx_bindings'] = sys.modules['tensorrt_rtx'] = None; "
            "sys.argv = ['stmae-edge', 'build', sys.argv[1], '--out', sys.argv[2]]; "
            "from stmae_edge.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, str(onnx_file), str(tmp_path / "x.plan")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: TensorRT is not installed: install TensorRT") and "\n" not in r.stderr.strip()


@needs_tensorrt
def test_build_command(onnx_file, tmp_path):
    out = tmp_path / "cli.plan"
    r = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "build", str(onnx_file), "--batch", "1:4:8",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and out.is_file() and "batch 1:4:8" in r.stdout, r.stderr
    done = [line for line in r.stderr.splitlines() if line.startswith("building (")]  # TensorRT's phases, followed
    assert len(done) == 1 and re.search(r"\): (\d+)/\1 in [\d.]+s done$", done[0]), r.stderr


@needs_tensorrt
def test_compute_capabilities_are_chosen_for_tensorrt_for_rtx_and_turing_is_refused(onnx_file, tmp_path):
    """TensorRT for RTX builds ahead of time for a set of GPUs, which `--compute-capability` names; on
    Turing it compiles no float32 matrix product (what its builder says, seen here: "Cannot compile
    operation ... for Turing (SM75): FP32 GEMM is not supported", fp16 graphs too), so 7.5 is refused
    first. Full TensorRT builds for the GPU it runs on and refuses the option."""
    from stmae_edge.engine_plan import import_tensorrt

    _, flavour = import_tensorrt()
    args = [sys.executable, "-m", "stmae_edge.cli", "build", str(onnx_file), "--batch", "1:1:2",
            "--out", str(tmp_path / "t.plan")]
    r = subprocess.run([*args, "--compute-capability", "8.6, 12.0"], capture_output=True, text=True, timeout=300)
    if flavour != "tensorrt-rtx":
        assert r.returncode == 2 and "--compute-capability is for TensorRT for RTX" in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert "target: compute capabilities: SM86, SM120" in r.stdout
    assert json.loads((tmp_path / "t.plan.json").read_text())["target"] == "compute capabilities: SM86, SM120"
    with pytest.raises(ConfigError, match=r"compute capability '9.0': TensorRT for RTX .* builds for 8.0, 8.6, "):
        build_engine(onnx_file, None, "1:1:2", tmp_path / "u.plan", compute_capabilities=["9.0"])
    with pytest.raises(ConfigError, match=r"7.5 \(Turing: T4, RTX 20xx\): TensorRT for RTX cannot compile"):
        build_engine(onnx_file, None, "1:1:2", tmp_path / "u.plan", compute_capabilities=["8.6", "7.5"])


@needs_tensorrt
def test_fp16_engine_builds_and_precision_must_match_the_graph(onnx_file, tiny_fp16_export, tmp_path):
    fp16 = tiny_fp16_export[1]
    plan, sidecar = build_engine(fp16, None, "1:2:4", tmp_path / "m.fp16.plan")
    assert sidecar["precision"] == "fp16" and plan.stat().st_size > 50_000
    with pytest.raises(ConfigError, match="is an fp32 graph"):
        build_engine(onnx_file, "fp16", "1:2:4", tmp_path / "x.plan")


@needs_tensorrt
def test_a_corrupt_timing_cache_does_not_stop_a_build(onnx_file, tmp_path, caplog):
    (tmp_path / "timing.cache").write_bytes(b"not a timing cache")
    with caplog.at_level("WARNING", logger="stmae_edge.engines.build"):
        plan, sidecar = build_engine(onnx_file, None, "1:1:2", tmp_path / "m.plan")
    assert plan.is_file()
    if sidecar["tensorrt"]["flavour"] == "tensorrt":  # said, not swallowed, and replaced by the build's own
        assert any("timing.cache not used" in r.getMessage() for r in caplog.records), caplog.text
        assert (tmp_path / "timing.cache").read_bytes() != b"not a timing cache"
    else:  # TensorRT for RTX keeps no cache: the file is neither read nor touched, and nothing is said
        assert (tmp_path / "timing.cache").read_bytes() == b"not a timing cache" and not caplog.records


def test_unreadable_onnx_is_an_export_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ExportError, match="not a readable ONNX"):
        build_engine(bad, None, "1:1:2", tmp_path / "bad.plan")


@needs_tensorrt
def test_a_plan_is_evaluated_by_tensorrt_not_read_as_a_checkpoint(onnx_file, synthetic_dataset, tmp_path):
    """`evaluate` takes the plan kind from the one table of model files (any case of suffix) and runs
    it in TensorRT; without a GPU that is a one-line error about the GPU, not torch's unpickler."""
    plan, _ = build_engine(onnx_file, "fp32", "1:4:8", tmp_path / "m.plan")
    upper = tmp_path / "M.ENGINE"
    upper.write_bytes(plan.read_bytes())
    (tmp_path / "M.ENGINE.json").write_bytes((tmp_path / "m.plan.json").read_bytes())
    r = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "info", str(upper)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout) == ModelMetadata.from_onnx(onnx_file).to_dict(), r.stderr
    r = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "evaluate", str(plan), str(synthetic_dataset), "--out",
                        str(tmp_path / "e.json")], capture_output=True, text=True, timeout=300)
    if r.returncode == 0:  # a machine with a GPU and TensorRT: the plan's figures, as the graph's
        from stmae_edge.evaluation.evaluate import evaluate

        on_plan, on_graph = json.loads((tmp_path / "e.json").read_text()), evaluate(onnx_file, synthetic_dataset)
        assert on_plan["image_auroc"] == pytest.approx(on_graph["image_auroc"], abs=0.02), (on_plan, on_graph)
    else:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "checkpoint" not in lines[0] and "Traceback" not in r.stderr
        # about the GPU, and what to do: run the graph the plan was built from
        assert "no NVIDIA GPU here" in lines[0] and "run the .onnx file it was built from" in lines[0], lines[0]


def test_the_build_progress_follows_the_first_top_phase_and_never_passes_its_total():
    """TensorRT's monitor protocol, played by hand: a second top phase, steps beyond the announced
    count, and a display that fails must neither overfill the bar nor stop the build."""
    from stmae_edge.engines.build import phase_monitor

    class FakeTensorRT:
        class IProgressMonitor:
            def __init__(self) -> None:
                pass

    calls = []

    def advance(n=1, status="", total=None):
        calls.append((n, status, total))

    monitor = phase_monitor(FakeTensorRT, advance)
    monitor.phase_start("Building engine", None, 3)
    monitor.phase_start("Optimizing graph", "Building engine", 30)
    assert all(monitor.step_complete("Optimizing graph", i) for i in range(30))  # never cancels
    monitor.phase_finish("Optimizing graph")
    for i in range(5):  # more steps than announced
        assert monitor.step_complete("Building engine", i)
    monitor.phase_start("Another top phase", None, 2)
    monitor.step_complete("Another top phase", 0)
    monitor.phase_finish("Building engine")
    assert calls[0] == (0, "Building engine", 3)
    assert sum(n for n, _, _ in calls) == 3 and {total for _, _, total in calls} == {3, None}
    assert ("Optimizing graph" in {status for _, status, _ in calls})

    def broken(*args, **kwargs):
        raise OSError("the terminal is gone")

    monitor = phase_monitor(FakeTensorRT, broken)
    monitor.phase_start("Building engine", None, 3)
    assert monitor.step_complete("Building engine", 0)


def test_a_plan_the_gpu_cannot_load_says_which_tensorrt_to_build_it_with():
    from types import SimpleNamespace

    from stmae_edge.runtime.tensorrt_backend import _rebuild_hint

    for major, minor in ((7, 5), (8, 7), (9, 0)):  # T4, Jetson Orin, H100: full TensorRT
        assert "install full TensorRT" in _rebuild_hint("tensorrt-rtx", SimpleNamespace(major=major, minor=minor))
    assert "rebuild it here" in _rebuild_hint("tensorrt-rtx", SimpleNamespace(major=8, minor=6))
    assert "rebuild it here" in _rebuild_hint("tensorrt", SimpleNamespace(major=7, minor=5))


def test_on_a_jetson_missing_tensorrt_says_to_see_jetpacks(monkeypatch, tmp_path):
    """JetPack installs TensorRT for the system Python; pip's tensorrt and TensorRT for RTX are not for L4T."""
    from stmae_edge import machine
    from stmae_edge.engine_plan import import_tensorrt
    from stmae_edge.errors import TensorRTMissingError

    for module in ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(machine, "TEGRA_RELEASE", tmp_path / "absent")
    monkeypatch.setattr(machine.platform, "release", lambda: "6.8.0-45-generic")
    with pytest.raises(TensorRTMissingError, match="pip install tensorrt") as elsewhere:
        import_tensorrt()
    assert "system-site-packages" not in str(elsewhere.value)
    (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    monkeypatch.setattr(machine, "TEGRA_RELEASE", tmp_path / "nv_tegra_release")
    with pytest.raises(TensorRTMissingError, match="--system-site-packages") as jetson:
        import_tensorrt()
    assert "tensorrt-rtx" not in str(jetson.value)


@needs_tensorrt
def test_a_plan_whose_tensorrt_is_missing_here_says_to_rebuild_it(onnx_file, tmp_path, monkeypatch):
    from stmae_edge.errors import TensorRTMissingError
    from stmae_edge.runtime.tensorrt_backend import TensorRTBackend

    plan, sidecar = build_engine(onnx_file, "fp32", "1:1:2", tmp_path / "m.plan")
    for module in ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(TensorRTMissingError) as caught:
        TensorRTBackend(plan)
    message = str(caught.value)
    assert f"built with {sidecar['tensorrt']['flavour']} {sidecar['tensorrt']['version']}" in message
    assert "rebuild the plan here" in message and "ort-cpu" in message and "\n" not in message


def test_a_plan_runs_on_its_own_gpu_and_leaves_the_callers_current_gpu_as_it_was():
    """CUDA's current device is per thread: the backend selected its GPU once, on the thread that
    opened it, and left it selected there. A host thread working on another GPU found its choice
    changed, and a Detector run from another thread ran on that thread's GPU, not its own. No GPU
    here: the CUDA runtime is stood in for by a record of the calls (scripts/gpu_acceptance.sh runs
    the real one)."""
    from types import SimpleNamespace

    from stmae_edge.runtime.tensorrt_backend import TensorRTBackend

    success = object()
    current, calls = {"device": 0}, []

    def get_device():
        return success, current["device"]

    def set_device(index):
        calls.append(index)
        current["device"] = index
        return (success,)

    cudart = SimpleNamespace(cudaError_t=SimpleNamespace(cudaSuccess=success), cudaGetDevice=get_device,
                             cudaSetDevice=set_device)
    backend = TensorRTBackend.__new__(TensorRTBackend)  # what __init__ leaves, without a GPU to open
    backend._cudart, backend._device_index = cudart, 1
    backend._graph, backend._allocations, backend._stream = None, [], None
    with backend._on_device():
        assert current["device"] == 1
    assert current["device"] == 0 and calls == [1, 0]
    with pytest.raises(RuntimeError), backend._on_device():
        raise RuntimeError("a failed launch")
    assert current["device"] == 0  # put back on failure too
    current["device"] = 1
    calls.clear()
    with backend._on_device():  # already current: nothing switched
        pass
    assert calls == []
    current["device"] = 0
    calls.clear()
    # run(): the engine is enqueued and waited for on the backend's GPU, the caller's put back after
    import numpy as np

    from stmae_edge.metadata import INPUT_NAME, MAP_NAME, SCORE_NAME

    seen = []
    backend._stream, backend.cuda_graph, backend.min_batch, backend.max_batch = object(), False, 1, 2
    backend._buffers = {INPUT_NAME: (np.zeros((2, 3, 4, 4), np.float32), 0, 0),
                        MAP_NAME: (np.ones((2, 1, 4, 4), np.float32), 0, 0), SCORE_NAME: (np.ones(2, np.float32), 0, 0)}
    backend._set_batch = lambda n: seen.append(("shape", current["device"]))
    backend._enqueue = lambda n: seen.append(("enqueue", current["device"]))
    cudart.cudaStreamSynchronize = lambda stream: (seen.append(("wait", current["device"])), (success,))[1]
    maps, scores = backend.run(np.zeros((1, 3, 4, 4), np.float32))
    assert seen == [("shape", 1), ("enqueue", 1), ("wait", 1)] and current["device"] == 0 and maps.shape == (1, 4, 4)
    backend._stream = None
    calls.clear()
    backend.close()
    assert current["device"] == 0 and calls == [1, 0]


@needs_tensorrt
def test_the_workspace_limit_reaches_tensorrt_and_a_jetson_caps_it(onnx_file, tmp_path, monkeypatch):
    """--workspace-mb is TensorRT's workspace pool, read back from the builder; on a Jetson, whose GPU
    shares the system's memory, the default is a quarter of it, at most 2 GiB."""
    from stmae_edge import machine
    from stmae_edge.engines import build

    _, sidecar = build_engine(onnx_file, None, "1:1:2", tmp_path / "a.plan", workspace_mb=64)
    assert sidecar["workspace_bytes"] == 64 << 20
    for wrong in (0, 1.5, True):
        with pytest.raises(ConfigError, match="workspace"):
            build_engine(onnx_file, None, "1:1:2", tmp_path / "b.plan", workspace_mb=wrong)
    monkeypatch.setattr(machine, "TEGRA_RELEASE", tmp_path / "absent")
    monkeypatch.setattr(machine.platform, "release", lambda: "5.15.148-tegra")
    monkeypatch.setattr(build, "total_memory_bytes", lambda: 8 << 30)  # an 8 GB Orin Nano
    assert build.default_workspace_bytes() == 2 << 30
    monkeypatch.setattr(build, "total_memory_bytes", lambda: 4 << 30)
    assert build.default_workspace_bytes() == 1 << 30
    _, sidecar = build_engine(onnx_file, None, "1:1:2", tmp_path / "c.plan")
    assert sidecar["workspace_bytes"] == 1 << 30
    monkeypatch.setattr(machine.platform, "release", lambda: "6.8.0-45-generic")
    assert build.default_workspace_bytes() is None


@needs_tensorrt
def test_ctrl_c_during_a_build_cancels_it_and_keeps_the_earlier_plan_and_sidecar(onnx_file, tmp_path, monkeypatch):
    """Ctrl-C reached TensorRT's callback as an exception inside C++; and a build cut off between its
    plan and its sidecar left a plan that read_plan refuses, the working engine lost. The monitor now
    cancels the build, and the pair is replaced together or not at all."""
    import contextlib
    import signal

    from stmae_edge.engine_plan import read_plan
    from stmae_edge.engines import build

    sigint_before = signal.getsignal(signal.SIGINT)
    calls = {"whole": 0, "cancelled": 0}

    def counting(kind, interrupt):
        @contextlib.contextmanager
        def bar(description, total):
            def advance(n=1, status="", total=None):
                calls[kind] += 1  # the monitor's phases and steps, as TensorRT reports them
                if interrupt and calls[kind] == 1:
                    signal.raise_signal(signal.SIGINT)  # as a user's Ctrl-C, while TensorRT builds
            yield advance
        return bar

    monkeypatch.setattr(build, "progress_bar", counting("whole", interrupt=False))
    plan, _ = build_engine(onnx_file, "fp32", "1:1:2", tmp_path / "m.plan")
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(build, "progress_bar", counting("cancelled", interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        build_engine(onnx_file, "fp32", "1:4:8", tmp_path / "m.plan")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == earlier
    assert read_plan(plan)[1]["batch"]["max"] == 2  # the earlier engine, still whole
    assert signal.getsignal(signal.SIGINT) is sigint_before
    # cancelled at its first step, not built to the end and then thrown away
    assert calls["whole"] > 10 and calls["cancelled"] < calls["whole"] / 2, calls
