"""Serving through a real Triton Inference Server (PyTriton's tritonserver) on loopback, and the model
repository for the official container. The server runs from .venv-serve (the serve extra needs
numpy < 2); scripts/test.sh makes it. Every server is started and stopped by these tests."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from loopback_http import LoopbackServer

from stmae_edge import data
from stmae_edge.errors import ConfigError, OutputError
from stmae_edge.metadata import ModelMetadata
from stmae_edge.runtime import Detector, RemoteDetector, RemoteError
from stmae_edge.serving.launch import serve_in_subprocess
from stmae_edge.serving.repository import served_config_update, write_repository
from stmae_edge.wire_format import without_folders

SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"


def serve_env_ready() -> bool:
    """.venv-serve exists and has PyTriton and tritonclient (the serve extra installs nothing on macOS)."""
    return SERVE_PYTHON.is_file() and subprocess.run(
        [str(SERVE_PYTHON), "-c", "import pytriton, tritonclient.grpc"], capture_output=True, timeout=120).returncode == 0


SERVE_ENV = serve_env_ready()
SKIP_REASON = "needs .venv-serve with the serve extra (PyTriton, Linux): bash scripts/setup_serve_env.sh"
needs_serve_env = pytest.mark.skipif(not SERVE_ENV, reason=SKIP_REASON)
RTOL = 1e-5


@pytest.fixture(scope="module")
def served(tiny_export, tmp_path_factory):
    """The tiny model's ONNX file served on loopback: (url, grpc url, metrics url, onnx)."""
    if not SERVE_ENV:
        pytest.skip(SKIP_REASON)
    _, onnx_path, _ = tiny_export
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_in_subprocess(SERVE_PYTHON, onnx_path, "--max-batch", "8", "--max-queue-delay-us", "20000",
                             name="tiny", log=log) as server:
        # the line says where the model runs: a GPU machine that fell back to its CPU shows it at start
        # (printed once Triton runs, which may be just after it answers ready)
        deadline = time.monotonic() + 30
        while "serving tiny" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "serving tiny (m.onnx, batches up to 8; ort-cpu on CPU: " in log.read_text()
        yield server.http, server.grpc, server.metrics, onnx_path


def test_http_answers_as_the_in_process_detector(served, synthetic_dataset):
    url, _, _, onnx_path = served
    paths = [s.path for s in data.eval_samples(synthetic_dataset)]
    with RemoteDetector(url, "tiny") as remote, Detector(onnx_path) as local:
        expected = ModelMetadata.from_onnx(onnx_path).to_dict()  # but for the training machine's folders
        assert remote.metadata.to_dict() == {**expected, "training": without_folders(expected["training"])}
        assert remote.thresholds == local.thresholds
        far, near = remote.predict(paths), local.predict(paths)
    assert [d.source for d in far] == [d.source for d in near]
    np.testing.assert_allclose([d.score for d in far], [d.score for d in near], rtol=RTOL)
    np.testing.assert_allclose([d.normalized_score for d in far], [d.normalized_score for d in near], rtol=RTOL, atol=1e-6)
    for a, b in zip(far, near, strict=True):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=RTOL, atol=1e-6)
        assert a.anomaly_map.flags.writeable  # as the in-process maps: the user may scale them in place
        assert a.is_anomalous == b.is_anomalous and len(a.regions) == len(b.regions)


def test_grpc_answers_as_the_in_process_detector(served, synthetic_dataset, tmp_path):
    _, grpc, _, onnx_path = served
    paths = [str(s.path) for s in data.eval_samples(synthetic_dataset)]
    client = (f"import json, sys, numpy as np; from stmae_edge.runtime import RemoteDetector\n"
              f"r = RemoteDetector({grpc!r}, 'tiny').predict({paths!r})\n"
              f"np.save({str(tmp_path / 'maps.npy')!r}, np.stack([d.anomaly_map for d in r]))\n"
              f"print(json.dumps([[d.score, d.is_anomalous] for d in r]))")
    answer = subprocess.run([str(SERVE_PYTHON), "-c", client], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert answer.returncode == 0, answer.stderr[-2000:]
    remote = json.loads(answer.stdout)
    with Detector(onnx_path) as local:
        near = local.predict(paths)
    np.testing.assert_allclose([s for s, _ in remote], [d.score for d in near], rtol=RTOL)
    assert [a for _, a in remote] == [d.is_anomalous for d in near]
    np.testing.assert_allclose(np.load(tmp_path / "maps.npy"), np.stack([d.anomaly_map for d in near]), rtol=RTOL, atol=1e-6)


def test_raw_frames_are_preprocessed_by_the_server_as_in_process(served, synthetic_dataset):
    url, _, _, onnx_path = served
    with RemoteDetector(url, "tiny") as remote, Detector(onnx_path) as local:
        height, width = local.preprocessing.input_size
        rng = np.random.default_rng(0)
        color = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
        gray = color[..., 1].copy()
        for model, frames in (("tiny_frames", color), ("tiny_gray", gray)):
            out = remote.infer(model, {"frames": frames}, ["score", "normalized_score", "is_anomalous", "anomaly_map"])
            maps, scores = local.raw_maps(list(frames))
            np.testing.assert_allclose(out["score"][:, 0], scores, rtol=RTOL)
            np.testing.assert_allclose(out["anomaly_map"], maps, rtol=RTOL, atol=1e-6)
            assert list(out["is_anomalous"][:, 0]) == list(scores > local.thresholds.image)


def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(served):
    url, _, _, onnx_path = served
    remote = RemoteDetector(url, "tiny")
    height, width = remote.preprocessing.input_size
    good = np.zeros((2, 3, height, width), np.float32)
    cases = {"unexpected shape": np.zeros((1, 3, height, width + 1), np.float32),
             "data-type is 'FP64'": np.zeros((1, 3, height, width), np.float64),
             "batch-size must be <= 8": np.zeros((9, 3, height, width), np.float32)}
    for expected, images in cases.items():
        with pytest.raises(RemoteError, match=expected) as caught:
            remote.infer("tiny", {"images": images}, ["score"])
        assert "\n" not in str(caught.value)
    with_nan = good.copy()
    with_nan[1, 0, 0, 0] = np.nan
    out = remote.infer("tiny", {"images": with_nan}, ["score", "error", "is_anomalous"])
    assert out["error"][0, 0] == b"" and b"NaN" in out["error"][1, 0] and not out["is_anomalous"][1, 0]
    with pytest.raises(RemoteError, match="image 1: the image has NaN"):
        remote.run_tensors(with_nan)
    with Detector(onnx_path) as local:  # and the good image in that batch was scored as usual
        np.testing.assert_allclose(out["score"][0, 0], local.run_tensors(good[:1])[1][0], rtol=RTOL)
    maps, scores = remote.run_tensors(good)
    assert maps.shape == (2, height, width) and np.isfinite(scores).all()
    with pytest.raises(RemoteError, match="cannot reach the server"):
        RemoteDetector("http://127.0.0.1:9", "tiny")
    with pytest.raises(ConfigError, match="model name"):
        RemoteDetector(url, "../etc")


def test_many_clients_are_batched_and_each_gets_its_own_answer(served, synthetic_dataset):
    url, _, _, onnx_path = served
    paths = [s.path for s in data.eval_samples(synthetic_dataset)]
    with Detector(onnx_path) as local:
        expected = {str(d.source): d.score for d in local.predict(paths)}
    remote = RemoteDetector(url, "tiny")
    mismatches, failures = [], []

    def client(index: int) -> None:
        try:
            for k in range(50):
                path = paths[(index + k) % len(paths)]
                got = remote.predict(path).score
                if abs(got - expected[str(path)]) > RTOL * abs(expected[str(path)]) + 1e-6:  # scores near 0 too
                    mismatches.append((path, got))
        except Exception as exc:  # reported below with the rest
            failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures and not mismatches, (failures[:3], mismatches[:3])
    stats = json.load(urllib.request.urlopen(f"{url}/v2/models/tiny/stats", timeout=10))["model_stats"][0]
    sizes = {b["batch_size"] for b in stats["batch_stats"]}
    assert int(stats["inference_count"]) >= 400 and max(sizes) > 1, sizes  # dynamic batching formed batches


def test_predict_with_server_writes_what_local_predict_writes(served, synthetic_dataset, tmp_path):
    url, _, _, onnx_path = served
    # the image folders themselves: predict does not look into subfolders (and refuses a folder without images)
    folders = [str(synthetic_dataset / "test" / kind) for kind in ("good", "scratch")]
    runs = {}
    for where, extra in (("local", [str(onnx_path)]), ("server", ["tiny", "--server", url])):
        result = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "predict", extra[0], *folders, "--out",
                                 str(tmp_path / where), "--no-overlays", *extra[1:]],
                                capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[where] = json.loads((tmp_path / where / "results.json").read_text())["results"]
    assert [r["source"] for r in runs["server"]] == [r["source"] for r in runs["local"]]
    assert len(runs["local"]) == 12  # 6 good and 6 scratched test images
    np.testing.assert_allclose([r["score"] for r in runs["server"]], [r["score"] for r in runs["local"]], rtol=RTOL)
    assert [r["decision"] for r in runs["server"]] == [r["decision"] for r in runs["local"]]
    refused = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "predict", "tiny", *folders, "--server", url,
                              "--backend", "ort-cpu"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error: --backend, --cuda-graph")


def test_health_readiness_and_metrics_come_from_triton(served):
    url, _, metrics, _ = served
    assert urllib.request.urlopen(f"{url}/v2/health/live", timeout=5).status == 200
    assert urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5).status == 200
    for model in ("tiny", "tiny_frames", "tiny_gray", "tiny_metadata"):
        assert urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=5).status == 200
    text = urllib.request.urlopen(metrics, timeout=10).read().decode()
    assert 'nv_inference_count{model="tiny",version="1"}' in text


def test_serve_off_linux_says_where_it_runs_instead_of_how_to_install_it(monkeypatch):
    """The serve extra installs nothing off Linux: pointing a Windows user at it sent them in a circle."""
    from stmae_edge.errors import BackendError
    from stmae_edge.serving.server import import_pytriton

    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(BackendError, match=r"^serve runs on Linux only .*`stmae-edge triton-repo MODEL` .*RemoteDetector"):
        import_pytriton()


@needs_serve_env
def test_instances_each_get_a_runtime_and_answer_alike(tiny_export, synthetic_dataset, tmp_path):
    _, onnx_path, _ = tiny_export
    paths = [s.path for s in data.eval_samples(synthetic_dataset)]
    with serve_in_subprocess(SERVE_PYTHON, onnx_path, "--instances", "2", "--max-batch", "4", name="tiny",
                             log=tmp_path / "serve.log") as server:
        url = server.http
        config = json.load(urllib.request.urlopen(f"{url}/v2/models/tiny/config", timeout=10))
        assert [g["count"] for g in config["instance_group"]] == [2] and config["max_batch_size"] == 4
        remote = RemoteDetector(url, "tiny")
        results: dict[int, list[float]] = {}

        def client(index: int) -> None:
            results[index] = [d.score for d in remote.predict(paths)]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    with Detector(onnx_path) as local:
        expected = [d.score for d in local.predict(paths)]
    assert len(results) == 4
    for scores in results.values():
        np.testing.assert_allclose(scores, expected, rtol=RTOL)


def test_serve_without_pytriton_says_how_to_install_it(tiny_export):
    _, onnx_path, _ = tiny_export
    if SERVE_PYTHON.is_file() and Path(sys.prefix).resolve() == SERVE_PYTHON.parents[1].resolve():
        pytest.skip("this test runs in the environment without PyTriton")
    result = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "serve", str(onnx_path)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # the commands themselves: a wheel carries no scripts/
    assert result.stderr.strip().splitlines()[-1] == (
        "error: PyTriton is not installed: install the serve extra in its own environment (PyTriton needs numpy "
        "< 2), made from a Python with a shared libpython (the system's python3): `python3 -m venv serve-env && "
        "serve-env/bin/pip install \"stmae-edge[serve]\"`; in a clone, `bash scripts/setup_serve_env.sh` does this "
        "(README, \"Serving many cameras\")")


@needs_serve_env
def test_serve_refuses_a_port_in_use_at_once(tiny_export):
    _, onnx_path, _ = tiny_export
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([str(SERVE_PYTHON), "-m", "stmae_edge.cli", "serve", str(onnx_path), "--address",
                                 "127.0.0.1", "--http-port", str(port)], capture_output=True, text=True, cwd=REPO,
                                timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 60
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --http-port {port} on 127.0.0.1: Address already in use; stop what uses it or choose another port")


def test_triton_repo_serves_the_file_its_config_describes(tiny_export, other_tiny_export, tmp_path, monkeypatch):
    """The config's metadata came from one read of the model and the served copy from another: a file
    replaced between them was served under the other model's metadata (preprocessing, statistics,
    thresholds), which the clients apply to its maps."""
    from stmae_edge.serving import repository

    model = tmp_path / "m.onnx"
    shutil.copyfile(tiny_export[1], model)
    original = model.read_bytes()
    from_onnx = repository.ModelMetadata.from_onnx

    def read_while_replaced(proto):
        shutil.copyfile(other_tiny_export[1], model)  # an export to the same name finished meanwhile
        return from_onnx(proto)

    monkeypatch.setattr(repository.ModelMetadata, "from_onnx", staticmethod(read_while_replaced))
    folder = write_repository(model, tmp_path / "repo", cpu=True)
    assert (folder / "1" / "model.onnx").read_bytes() == original


def test_triton_repo_stages_its_model_folder_where_triton_does_not_look(tiny_export, tmp_path, monkeypatch, caplog):
    """Triton takes every folder of its repository as a model, hidden ones too: the staging folder inside
    the repository was polled as a model that failed to load, and one left by a killed run stopped a
    server started with --exit-on-error (its default) from starting."""
    from stmae_edge.serving import repository

    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)  # a model served already
    seen_by_triton = []
    move = repository.move_into_place

    def renamed(staged, target):
        seen_by_triton.append(sorted(p.name for p in repo.iterdir()))
        move(staged, target)

    monkeypatch.setattr(repository, "move_into_place", renamed)
    folder = write_repository(tiny_export[1], repo, cpu=True)
    assert seen_by_triton == [["other"]] and sorted(p.name for p in repo.iterdir()) == sorted(["other", folder.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # nothing left beside it either

    # A repository that is a file system of its own (a mount) cannot take a folder renamed from beside it
    monkeypatch.setattr(repository.os, "access", lambda path, mode: False)
    seen_by_triton.clear()
    with caplog.at_level("WARNING", logger=repository.__name__):
        write_repository(tiny_export[1], repo, name="again", cpu=True)
    assert [name for name in seen_by_triton[0] if name.startswith(".")]  # staged inside, with a warning
    assert "staged in a hidden folder inside it" in caplog.text and (repo / "again" / "config.pbtxt").is_file()

    # A bind mount shares its parent's device, and refuses a rename from it all the same: staged again inside
    monkeypatch.undo()
    caplog.clear()

    def bind_mounted(staged, target):
        if staged.parent.parent != repo:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        move(staged, target)

    monkeypatch.setattr(repository, "move_into_place", bind_mounted)
    with caplog.at_level("WARNING", logger=repository.__name__):
        write_repository(tiny_export[1], repo, name="bound", cpu=True)
    assert "(a bind mount)" in caplog.text and (repo / "bound" / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]

    # What a killed run of a version that staged inside the repository left there is removed
    left = repo / ".stmae-edge-staging-0123456789ab"
    (left / "m" / "1").mkdir(parents=True)
    os.utime(left, (time.time() - 2 * 86400,) * 2)
    write_repository(tiny_export[1], repo, name="later", cpu=True)
    assert not left.exists()
    assert sorted(p.name for p in repo.iterdir()) == sorted(["again", "bound", "later", folder.name, "other"])


def parse_config(path: Path) -> dict:
    """config.pbtxt through the ModelConfig protobuf message that tritonclient ships (in .venv-serve)."""
    script = ("import json, sys; from google.protobuf import text_format, json_format\n"
              "from tritonclient.grpc import model_config_pb2\n"
              "c = text_format.Parse(open(sys.argv[1]).read(), model_config_pb2.ModelConfig())\n"
              "print(json.dumps(json_format.MessageToDict(c, preserving_proto_field_name=True)))")
    result = subprocess.run([str(SERVE_PYTHON), "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@needs_serve_env
def test_triton_repo_for_onnx_parses_as_a_model_config(tiny_export, tmp_path):
    _, onnx_path, _ = tiny_export
    folder = write_repository(onnx_path, tmp_path / "repo", max_batch=16, max_queue_delay_us=500, instances=2, cpu=True)
    assert folder.name == onnx_path.stem and (folder / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    config = parse_config(folder / "config.pbtxt")
    height, width = ModelMetadata.from_onnx(onnx_path).preprocessing.input_size
    assert config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 16
    assert config["input"] == [{"name": "images", "data_type": "TYPE_FP32", "dims": ["3", str(height), str(width)]}]
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["anomaly_map"]["dims"] == ["1", str(height), str(width)] and outputs["score"]["dims"] == ["1"]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "500"
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    # only version 1, which the metadata document describes: Triton serves the highest version otherwise
    assert config["version_policy"] == {"specific": {"versions": ["1"]}}
    document = json.loads(config["parameters"]["stmae_edge_metadata"]["string_value"])
    expected = ModelMetadata.from_onnx(onnx_path).to_dict()
    assert document["metadata"] == {**expected, "training": without_folders(expected["training"])}
    with pytest.raises(OutputError, match="exists"):
        write_repository(onnx_path, tmp_path / "repo")
    with pytest.raises(ConfigError, match="model name"):
        write_repository(onnx_path, tmp_path / "repo", name="a b")
    # More than the runtime's client takes would be written, then refused by every RemoteDetector
    with pytest.raises(ConfigError, match="--max-batch must be a whole number from 1 to 4096, got 5000"):
        write_repository(onnx_path, tmp_path / "repo2", max_batch=5000)
    assert not (tmp_path / "repo2").exists()


@needs_serve_env
def test_a_threshold_written_to_a_served_model_reaches_its_config(tiny_export, tmp_path):
    from test_cli import _assert_one_line_error, run

    from stmae_edge.scoring import Thresholds

    _, onnx_path, _ = tiny_export
    folder = write_repository(onnx_path, tmp_path / "repo", max_batch=8)
    assert [p.name for p in (tmp_path / "repo").iterdir()] == [folder.name]  # no staging folder left
    before = parse_config(folder / "config.pbtxt")
    r = run("threshold", str(folder / "1" / "model.onnx"), "--threshold", "2.25", "--pixel-threshold", "3.5", "--write")
    assert r.returncode == 0 and f"wrote them to {folder / 'config.pbtxt'} too" in r.stdout, r.stderr
    after = parse_config(folder / "config.pbtxt")
    document = json.loads(after["parameters"]["stmae_edge_metadata"]["string_value"])
    written = {"image": 2.25, "pixel": 3.5, "rule": "image: set by hand (2.25); pixel: set by hand (3.5)"}
    assert document["thresholds"] == document["metadata"]["thresholds"] == written
    assert ModelMetadata.from_onnx(folder / "1" / "model.onnx").thresholds.to_dict() == written
    before_document = json.loads(before["parameters"]["stmae_edge_metadata"]["string_value"])
    assert document == {**before_document, "thresholds": written,
                        "metadata": {**before_document["metadata"], "thresholds": written}}
    assert {k: v for k, v in after.items() if k != "parameters"} == {k: v for k, v in before.items() if k != "parameters"}
    # a model file outside a repository is not taken for one
    assert served_config_update(onnx_path, Thresholds(1, 2)) is None
    # protobuf's other spelling, `value: {`, and a commented-out copy before the real one
    config = folder / "config.pbtxt"
    text = config.read_text()
    config.write_text("# parameters { key: \"stmae_edge_metadata\" value { string_value: \"{}\" } }\n"
                      + text.replace("value {", "value: {"))
    r = run("threshold", str(folder / "1" / "model.onnx"), "--threshold", "1.5", "--write")
    assert r.returncode == 0, r.stderr
    document = json.loads(parse_config(config)["parameters"]["stmae_edge_metadata"]["string_value"])
    assert document["thresholds"]["image"] == 1.5 and config.read_text().startswith("# parameters {")
    # a spelling it cannot read: one line, and the model file left as it was, not out of step with its config
    config.write_text(text.replace('string_value: "', "string_value: '", 1))
    _assert_one_line_error(run("threshold", str(folder / "1" / "model.onnx"), "--threshold", "9", "--write"),
                           "is not written as triton-repo writes it; nothing was written")
    assert ModelMetadata.from_onnx(folder / "1" / "model.onnx").thresholds.image == 1.5


def test_triton_repo_writes_through_no_planted_link_and_removes_no_folder_of_others(tiny_export, tmp_path):
    _, onnx_path, _ = tiny_export
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    elsewhere.mkdir()
    repo.mkdir()
    (repo / f".{onnx_path.stem}.partial").symlink_to(elsewhere)  # the fixed temporary name it used
    (repo / "theirs.partial").mkdir()
    folder = write_repository(onnx_path, repo)
    assert not folder.is_symlink() and (folder / "config.pbtxt").is_file()
    assert folder.stat().st_mode & 0o777 == 0o755  # readable by a Triton running as another user
    assert list(elsewhere.iterdir()) == [] and (repo / "theirs.partial").is_dir()


@needs_serve_env
def test_triton_repo_for_a_plan_keeps_its_profile_and_refuses_rtx_plans(tiny_export, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT for RTX: pip install '.[rtx]'")
    from stmae_edge.engine_plan import read_plan, sidecar_path
    from stmae_edge.engines.build import build_engine

    _, onnx_path, _ = tiny_export
    plan, _ = build_engine(onnx_path, "fp32", "1:4:8", tmp_path / "m.plan")
    with pytest.raises(ConfigError, match="built by TensorRT for RTX"):
        write_repository(plan, tmp_path / "repo")
    # The same plan as full TensorRT would describe it: what a user's GPU server builds.
    side = sidecar_path(plan)
    sidecar = json.loads(side.read_text())
    sidecar["tensorrt"]["flavour"] = "tensorrt"
    side.write_text(json.dumps(sidecar))
    read_plan(plan)  # still a consistent plan and sidecar
    with pytest.raises(ConfigError, match="exceeds the plan's batch profile"):
        write_repository(plan, tmp_path / "repo", max_batch=16)
    with pytest.raises(ConfigError, match="GPU only"):
        write_repository(plan, tmp_path / "repo", cpu=True)
    folder = write_repository(plan, tmp_path / "repo", max_batch=8)
    config = parse_config(folder / "config.pbtxt")
    assert config["platform"] == "tensorrt_plan" and config["max_batch_size"] == 8
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_GPU", "profile": ["0"]}]
    # its sidecar beside it, as beside every plan: the served plan is re-thresholded where it is, config too
    assert read_plan(folder / "1" / "model.plan")[2].thresholds == read_plan(plan)[2].thresholds
    from test_cli import run
    r = run("threshold", str(folder / "1" / "model.plan"), "--threshold", "4.25", "--write")
    assert r.returncode == 0 and "config.pbtxt too" in r.stdout, r.stderr
    document = json.loads(parse_config(folder / "config.pbtxt")["parameters"]["stmae_edge_metadata"]["string_value"])
    assert document["thresholds"]["image"] == read_plan(folder / "1" / "model.plan")[2].thresholds.image == 4.25


def test_an_image_whose_output_is_not_finite_fails_alone(tiny_export, caplog):
    from stmae_edge.errors import BackendError
    from stmae_edge.serving.server import score_batch

    class OverflowingDetector(Detector):
        """The real detector, but an image of all 7.0 makes the network's output non-finite, as an fp16
        overflow would: run_tensors then refuses the whole batch, as the real check does."""

        def run_tensors(self, batch):
            if any((image == 7.0).all() for image in batch):
                raise BackendError("the network produced NaN or infinite values; check the model with `stmae-edge verify`")
            return super().run_tensors(batch)

    _, onnx_path, _ = tiny_export
    with OverflowingDetector(onnx_path) as detector:
        height, width = detector.preprocessing.input_size
        images = np.random.default_rng(0).normal(size=(3, 3, height, width)).astype(np.float32)
        images[1] = 7.0
        with caplog.at_level("WARNING", logger="stmae_edge.serving.server"):
            out = score_batch(detector, images)
        alone = [detector.run_tensors(images[i:i + 1])[1][0] for i in (0, 2)]
    # the clients read their own image's error; whoever watches the server sees that batches fail
    assert "a batch of 3 images failed (the network produced NaN or infinite values;" in caplog.text
    assert out["error"][0, 0] == out["error"][2, 0] == b"" and b"NaN or infinite" in out["error"][1, 0]
    np.testing.assert_allclose(out["score"][[0, 2], 0], alone, rtol=RTOL)
    assert out["normalized_score"][1, 0] == 0.0 and not out["is_anomalous"][1, 0]


def test_serve_checks_its_arguments_before_anything_starts(tiny_export):
    from stmae_edge.serving.server import serve

    _, onnx_path, _ = tiny_export
    with pytest.raises(ConfigError, match="IPv4"):
        serve(onnx_path, address="::1")
    with pytest.raises(ConfigError, match="--http-port must be a whole number from 1 to 65535"):
        serve(onnx_path, http_port=70000)
    with pytest.raises(ConfigError, match="must differ"):
        serve(onnx_path, address="127.0.0.1", http_port=18555, grpc_port=18555)


def FakeServer(status: int, headers: dict, body: bytes) -> LoopbackServer:  # noqa: N802 (reads as a class)
    """A loopback HTTP server that answers every request with one canned response."""
    return LoopbackServer(lambda *request: (status, headers, body))


def test_the_client_reads_lowercased_headers_and_refuses_what_is_not_triton(tiny_export):
    _, onnx_path, _ = tiny_export
    metadata = ModelMetadata.from_onnx(onnx_path)
    document = json.dumps({"name": "tiny", "max_batch": 4, "metadata": metadata.to_dict(),
                           "thresholds": metadata.thresholds.to_dict()}).encode()
    header = json.dumps({"outputs": [{"name": "metadata", "datatype": "BYTES", "shape": [1, 1],
                                      "parameters": {"binary_data_size": 4 + len(document)}}]}).encode()
    body = header + len(document).to_bytes(4, "little") + document
    proxy = FakeServer(200, {"inference-header-content-length": str(len(header))}, body)  # as Envoy sends it
    try:
        remote = RemoteDetector(proxy.url, "tiny")
        assert remote.metadata.to_dict() == metadata.to_dict() and remote.batch_size == 4
    finally:
        proxy.close()
    for status, text in ((200, b"<html>a web page</html>"), (200, b'{"outputs": [{"name": "x"}]}')):
        other = FakeServer(status, {"Content-Type": "text/html"}, text)
        try:
            with pytest.raises(RemoteError, match="not a Triton"):
                RemoteDetector(other.url, "tiny")
        finally:
            other.close()
    with socket.socket() as raw:  # something that is not HTTP at all (Triton's gRPC port, say)
        raw.bind(("127.0.0.1", 0))
        raw.listen()
        port = raw.getsockname()[1]

        def answer_garbage():
            connection, _ = raw.accept()
            connection.recv(65536)
            connection.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00garbage\r\n\r\n")
            connection.close()

        threading.Thread(target=answer_garbage, daemon=True).start()
        with pytest.raises(RemoteError, match="not HTTP|not a Triton"):
            RemoteDetector(f"http://127.0.0.1:{port}", "tiny", timeout=10)
