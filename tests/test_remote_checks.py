"""RemoteDetector against a loopback fake of Triton's HTTP API (KServe v2 with the binary tensor
extension): what it does with answers that a real server can send but should not, without PyTriton.

The fake answers as `stmae-edge triton-repo`'s repository in the official container does (no
NAME_metadata model, the metadata in the model config, no error output) or as `stmae-edge serve` does
(the NAME_metadata model, an error output), with the values each test chooses."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from loopback_http import LoopbackServer

from stmae_edge import wire_format as wire
from stmae_edge.errors import BackendError, ConfigError
from stmae_edge.metadata import ModelMetadata
from stmae_edge.runtime import RemoteDetector, RemoteError
from stmae_edge.scoring import Thresholds


def encode_outputs(outputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """(body, header length) of an infer answer with every output as binary data."""
    entries, blobs = [], []
    for name, array in outputs.items():
        if array.dtype == object:
            blob = b"".join(len(x).to_bytes(4, "little") + x for x in array.reshape(-1))
            datatype = "BYTES"
        else:
            blob = np.ascontiguousarray(array, np.float32).tobytes()
            datatype = "FP32"
        entries.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                        "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    header = json.dumps({"outputs": entries}).encode()
    return header + b"".join(blobs), len(header)


class FakeTriton(LoopbackServer):
    """A loopback server routing /v2/models/NAME/infer and /v2/models/NAME/config to `answer(method,
    model, action, batch)`, which returns (status, dict of outputs | JSON-able | raw bytes). `batch`
    is the request's leading input dimension (None for a config request)."""

    def __init__(self, answer, prefix: str = ""):
        self.requests: list[tuple[str, str]] = []

        def respond(method, path, headers, body):
            if not path.startswith(prefix + "/v2/"):  # what a reverse proxy serving under `prefix` forwards
                return 404, {}, b'{"error": "not found"}'
            _, _, _, model, action = path[len(prefix):].split("/")[:5]
            batch = None
            if method == "POST":
                head = json.loads(body[:int(headers["Inference-Header-Content-Length"])])
                batch = head["inputs"][0]["shape"][0]
            self.requests.append((model, action))
            status, content = answer(method, model, action, batch)
            extra = {}
            if isinstance(content, dict) and content and all(isinstance(v, np.ndarray) for v in content.values()):
                content, header_length = encode_outputs(content)
                extra["Inference-Header-Content-Length"] = str(header_length)
            elif not isinstance(content, bytes):
                content = json.dumps(content).encode()
            return status, extra, content

        super().__init__(respond)


@pytest.fixture(scope="module")
def metadata(tiny_export) -> ModelMetadata:
    return ModelMetadata.from_onnx(tiny_export[1])


def document_for(model: ModelMetadata, /, **changes) -> dict:
    """The document `stmae-edge triton-repo` writes into the config, with `changes` (None: drop the key)."""
    document = {"name": "tiny", "max_batch": 4, "metadata": model.to_dict(), "thresholds": model.thresholds.to_dict()}
    document.update(changes)
    return {k: v for k, v in document.items() if v is not None}


def repo_server(metadata: ModelMetadata, document=None, config=None, infer=None, prefix: str = "") -> FakeTriton:
    """A triton-repo model in the official container: NAME_metadata is unknown (400), the config holds
    the document, and `infer(batch)` gives the model's outputs (or a refusal: (status, JSON-able))."""
    document = document_for(metadata) if document is None else document
    if config is None:
        config = {"name": "tiny", "parameters": {wire.METADATA_PARAMETER: {"string_value": json.dumps(document)}}}

    def answer(method, model, action, batch):
        if model == "tiny" + wire.METADATA_SUFFIX:
            return 400, {"error": f"Request for unknown model: '{model}' is not found"}
        if action == "config":
            return 200, config
        answered = infer(batch)
        return answered if isinstance(answered, tuple) else (200, answered)
    return FakeTriton(answer, prefix)


def network_outputs(metadata: ModelMetadata, batch: int, score: float = 0.0, map_width: int | None = None):
    """What a triton-repo model answers: scores (N, 1) and maps (N, 1, H, W)."""
    height, width = metadata.preprocessing.input_size
    return {wire.SCORE: np.full((batch, 1), score, np.float32),
            wire.ANOMALY_MAP: np.zeros((batch, 1, height, map_width or width), np.float32)}


def frames(metadata: ModelMetadata, count: int) -> list[np.ndarray]:
    height, width = metadata.preprocessing.input_size
    return [np.full((height, width), 100 + i, np.uint8) for i in range(count)]


def test_a_nan_score_from_a_model_without_an_error_output_is_refused_not_passed(metadata):
    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch, score=np.nan)) as server:
        remote = RemoteDetector(server.url, "tiny")
        with pytest.raises(RemoteError, match="model tiny: the network produced NaN or infinite values"):
            remote.predict(frames(metadata, 2))
    # the same answer with finite scores is read as before
    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch, score=0.0)) as good:
        remote = RemoteDetector(good.url, "tiny")
        results = remote.predict(frames(metadata, 3))
        assert [r.score for r in results] == [0.0] * 3
        assert all(r.is_anomalous == (0.0 > remote.thresholds.image) for r in results)


def test_maps_of_the_wrong_shape_are_refused(metadata):
    height, width = metadata.preprocessing.input_size
    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch, map_width=width + 1)) as server:
        with pytest.raises(RemoteError, match=f"maps \\(2, {height}, {width + 1}\\).*does not fit"):
            RemoteDetector(server.url, "tiny").predict(frames(metadata, 2))
    with repo_server(metadata, infer=lambda batch: {wire.SCORE: np.zeros((batch, 1), np.float32)}) as no_map:
        with pytest.raises(RemoteError, match="has no anomaly_map output"):
            RemoteDetector(no_map.url, "tiny").predict(frames(metadata, 1))


def test_an_image_the_server_refuses_is_named_by_its_index_in_the_call(metadata):
    """`stmae-edge serve` answers an error per image; the second request's first image is image 2."""
    document = json.dumps(document_for(metadata, max_batch=2)).encode()
    calls = []

    def answer(method, model, action, batch):
        if model == "tiny" + wire.METADATA_SUFFIX:
            return 200, {wire.METADATA: np.array([[document]], dtype=object)}
        calls.append(batch)
        errors = np.full((batch, 1), b"", dtype=object)
        if len(calls) == 2:
            errors[0, 0] = b"the image has NaN or infinite values; nothing was scored"
        return 200, {**network_outputs(metadata, batch), wire.ERROR: errors}

    with FakeTriton(answer) as server:
        remote = RemoteDetector(server.url, "tiny")
        assert remote.batch_size == 2
        with pytest.raises(RemoteError, match="^image 2: the image has NaN"):
            remote.predict(frames(metadata, 4))
        assert calls == [2, 2]
        # image 2 refused here (2 channels) and left out with return_errors: the server's first image of
        # the second request is then image 3 of the call
        calls.clear()
        mixed = list(frames(metadata, 4))
        mixed[2] = np.zeros((*mixed[2].shape[:2], 2), np.uint8)
        with pytest.raises(RemoteError, match="^image 3: the image has NaN"):
            remote.predict(mixed, return_errors=True)
        assert calls == [2, 1]


@pytest.mark.parametrize("max_batch", [0, -3, 2.5, "8", True, 10**9])
def test_a_max_batch_that_is_not_a_whole_number_in_range_is_refused(metadata, max_batch):
    with repo_server(metadata, document=document_for(metadata, max_batch=max_batch),
                     infer=lambda batch: network_outputs(metadata, batch)) as server:
        with pytest.raises(RemoteError, match=f"max_batch {max_batch!r}, not a whole number from 1 to 4096"):
            RemoteDetector(server.url, "tiny")


def malformed_cases(metadata: ModelMetadata):
    """(what the metadata model answers or None, the config, the message expected)."""
    good = document_for(metadata)
    parameter = {wire.METADATA_PARAMETER: {"string_value": json.dumps(good)}}

    def config(value):
        return {"parameters": {wire.METADATA_PARAMETER: {"string_value": value}}}

    return [
        (None, config("{not json"), "parameter of model tiny is not valid JSON"),
        (None, config("[1, 2]"), "parameter of model tiny is a JSON list, not an object"),
        (None, config(json.dumps(document_for(metadata, metadata=None))), "has no 'metadata' entry"),
        (None, config(json.dumps(document_for(metadata, metadata={"schema": "other"}))),
         "the metadata document of model tiny: metadata schema 'other'"),
        (None, config(json.dumps(document_for(metadata, thresholds={"image": "high"}))),
         "has malformed 'thresholds'"),
        (None, config(json.dumps(document_for(metadata, thresholds={"image": 1.0}))),
         "has malformed 'thresholds'"),
        (None, config(json.dumps(document_for(metadata, runtime=[1]))), "'runtime' entry that is a list"),
        (None, {"parameters": [parameter]}, "has no stmae-edge metadata"),
        (None, b"<html>not json</html>", "the config of model tiny is not valid JSON"),
        ({wire.METADATA: np.array([[b"{broken"]], dtype=object)}, None, "model tiny_metadata answered is not valid JSON"),
        ({"other": np.array([[b"{}"]], dtype=object)}, None, "has no 'metadata' text"),
    ]


def test_the_served_metadata_names_no_folder_of_the_training_machine(metadata):
    from dataclasses import replace

    training = {**metadata.training, "holdout": "from /home/someone/parts/held",
                "backbone_weights": "/home/someone/weights/lite0.pth", "train_config": {
        **metadata.training.get("train_config", {}), "holdout_dir": "/home/someone/parts/held"}}
    assert metadata.training["data_dir"].startswith("/")  # the check can fail: train records it
    document = wire.metadata_document("m", 8, replace(metadata, training=training), metadata.thresholds)
    text = json.dumps(document)
    assert metadata.training["data_dir"] not in text and "/home/someone" not in text
    assert ModelMetadata.from_dict(document["metadata"]).model_hash == metadata.model_hash  # still the model's


def test_malformed_metadata_documents_are_remote_errors_that_name_the_part(metadata):
    for metadata_answer, config, expected in malformed_cases(metadata):
        def answer(method, model, action, batch, metadata_answer=metadata_answer, config=config):
            if model == "tiny" + wire.METADATA_SUFFIX:
                return (400, {"error": "unknown model"}) if metadata_answer is None else (200, metadata_answer)
            return 200, config

        with FakeTriton(answer) as server:
            with pytest.raises(RemoteError, match=expected) as caught:
                RemoteDetector(server.url, "tiny")
            assert "\n" not in str(caught.value)


@pytest.mark.parametrize("status,expected", [(400, "no model 'tiny' there"), (404, "no model 'tiny' there"),
                                             (500, "model repository failed to load")])
def test_a_config_the_server_fails_to_give_is_its_failure_not_a_missing_model(status, expected):
    def answer(method, model, action, batch):
        if model == "tiny" + wire.METADATA_SUFFIX:
            return 400, {"error": "unknown model"}
        return status, {"error": "model repository failed to load" if status == 500 else "not found"}

    with FakeTriton(answer) as server, pytest.raises(RemoteError, match=expected) as caught:
        RemoteDetector(server.url, "tiny")
    assert status != 500 or "no model" not in str(caught.value)


def test_a_batch_size_above_the_servers_max_is_capped_with_a_warning(metadata, caplog):
    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch)) as server:
        with caplog.at_level(logging.WARNING, logger="stmae_edge.runtime.remote"):
            remote = RemoteDetector(server.url, "tiny", batch_size=16)
        assert remote.batch_size == 4
        assert any(r.levelno == logging.WARNING and "batch_size 16 exceeds the max batch of model tiny" in r.getMessage()
                   for r in caplog.records)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="stmae_edge.runtime.remote"):
            assert RemoteDetector(server.url, "tiny", batch_size=3).batch_size == 3
            assert RemoteDetector(server.url, "tiny").batch_size == 4
        assert not caplog.records


@pytest.mark.parametrize("keyword, value, message", [
    ("timeout", "abc", "timeout 'abc' must be a number of seconds above 0"),
    ("timeout", -1, "timeout -1 must be a number of seconds above 0"),
    ("timeout", 0, "timeout 0 must be a number of seconds above 0"),
    ("min_region_area", -2, "min_region_area -2 must be a whole number, at least 0"),
    ("min_region_area", 1.5, "min_region_area 1.5 must be a whole number, at least 0"),
])
def test_bad_arguments_are_config_errors_before_anything_is_sent(keyword, value, message):
    # No server at all: the arguments are refused before the first request.
    with pytest.raises(ConfigError, match=re.escape(message)):
        RemoteDetector("http://127.0.0.1:9", "tiny", **{keyword: value})


def test_thresholds_are_assignable_as_on_the_in_process_detector(metadata):
    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch, score=1.0)) as server:
        remote = RemoteDetector(server.url, "tiny")
        assert remote.thresholds == metadata.thresholds
        with pytest.raises(ConfigError, match="thresholds must be a stmae_edge.scoring.Thresholds, not dict"):
            remote.thresholds = {"image": 0.5}
        remote.thresholds = Thresholds(image=0.5, pixel=metadata.thresholds.pixel, rule="the line's own")
        assert remote.predict(frames(metadata, 1)[0]).is_anomalous
        remote.thresholds = Thresholds(image=2.0, pixel=metadata.thresholds.pixel, rule="the line's own")
        assert not remote.predict(frames(metadata, 1)[0]).is_anomalous


def test_a_served_model_is_used_as_the_in_process_detector_is(metadata):
    # one predict for both (runtime.detector.ImageScorer): timings and raw maps come with it
    from stmae_edge.runtime.detector import ImageScorer

    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch, score=0.5)) as server:
        remote = RemoteDetector(server.url, "tiny", batch_size=2)
        assert isinstance(remote, ImageScorer)
        timings: dict = {}
        results = remote.predict(frames(metadata, 3), timings=timings)
        assert [r.score for r in results] == [0.5] * 3 and set(timings) == {"preprocess", "infer", "postprocess"}
        maps, scores = remote.raw_maps(frames(metadata, 3))
        assert maps.shape == (3, *metadata.preprocessing.input_size) and scores.tolist() == [0.5] * 3


@pytest.mark.parametrize("url", [None, b"http://127.0.0.1:9", 8000])
def test_a_url_that_is_not_a_string_is_a_config_error(url):
    """RemoteDetector(None, ...) ended in an AttributeError, a bytes url in a TypeError."""
    with pytest.raises(ConfigError, match=re.escape("give http(s)://HOST:PORT[/PATH] or grpc://HOST:PORT as a string")):
        RemoteDetector(url, "tiny")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:9", "http://", "grpc://127.0.0.1:9/triton", "127.0.0.1:8000"])
def test_a_url_of_another_kind_is_a_config_error(url):
    with pytest.raises(ConfigError, match=re.escape("give http(s)://HOST:PORT[/PATH] or grpc://HOST:PORT")):
        RemoteDetector(url, "tiny")


def test_a_server_behind_a_reverse_proxy_path_is_reached(metadata):
    """The README puts a reverse proxy in front of the server; one that serves it under a path was
    refused as a url."""
    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch, score=0.5),
                     prefix="/lines/3") as server:
        remote = RemoteDetector(server.url + "/lines/3/", "tiny")
        assert remote.url == server.url + "/lines/3" and remote.predict(frames(metadata, 1)[0]).score == 0.5


def test_a_closed_or_misused_remote_detector_says_so_as_the_in_process_one_does(metadata):
    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch)) as server:
        remote = RemoteDetector(server.url, "tiny")
        height, width = metadata.preprocessing.input_size
        for bad in (None, np.zeros((1, 3, height, width), np.float64), np.zeros((1, 3, height + 1, width), np.float32)):
            with pytest.raises(ConfigError, match=f"expected float32 images \\(N, 3, {height}, {width}\\)"):
                remote.run_tensors(bad)
        sent = len(server.requests)
        remote.close()
        remote.close()  # twice is fine
        with pytest.raises(BackendError, match="closed"):
            remote.predict(frames(metadata, 1))
        with pytest.raises(BackendError, match="closed"):
            with remote:
                pass
        assert len(server.requests) == sent  # nothing sent after the refusals and the close


def test_an_output_of_a_datatype_the_client_does_not_read_is_refused_in_json_replies_too(metadata):
    """A JSON reply's unknown datatype was read as float32 without a word (a binary one was refused)."""
    def infer(batch):
        outputs = network_outputs(metadata, batch)
        return {"outputs": [{"name": name, "datatype": "FP8" if name == wire.SCORE else "FP32",
                             "shape": list(array.shape), "data": array.ravel().tolist()}
                            for name, array in outputs.items()]}
    with repo_server(metadata, infer=infer) as server:
        remote = RemoteDetector(server.url, "tiny")
        with pytest.raises(RemoteError, match="answered with datatype FP8, which this client does not read"):
            remote.predict(frames(metadata, 2))


def test_a_served_model_inspects_a_line_scan_strip(metadata):
    """StreamingInspector takes any scorer with raw_maps, a RemoteDetector too (a check added for a
    host's mistake had refused it)."""
    from stmae_edge.runtime.linescan import StreamingInspector

    height, width = metadata.preprocessing.input_size
    with repo_server(metadata, infer=lambda batch: network_outputs(metadata, batch)) as server:
        inspector = StreamingInspector(RemoteDetector(server.url, "tiny"), overlap=0)
        assert inspector.push(np.full((2 * height, 2 * width), 100, np.uint8)) == [] and inspector.flush() == []
        assert inspector.tiles == 4
    with pytest.raises(ConfigError, match="Detector or RemoteDetector, not str"):
        StreamingInspector(server.url)


def test_predict_through_a_server_that_fails_part_way_keeps_what_it_scored_and_resumes(metadata, tmp_path):
    """The CLI end to end: a server that answers the first batch and then fails (503, as Triton going
    down does) leaves the first batch's results and overlays in --out, one error line naming the failure
    and what to do, exit code 3; the same command with --resume, the server back, scores the rest."""
    import subprocess
    import sys

    import cv2

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, frame in enumerate(frames(metadata, 5)):
        cv2.imwrite(str(inputs / f"f{i}.png"), frame)
    served, down = [], [True]

    def infer(batch):
        if served and down[0]:
            return 503, {"error": "Server is shutting down"}
        served.append(batch)
        return network_outputs(metadata, batch, score=0.5)

    out = tmp_path / "out"
    with repo_server(metadata, infer=infer) as server:
        command = [sys.executable, "-m", "stmae_edge.cli", "predict", "tiny", str(inputs), "--out", str(out),
                   "--server", server.url, "--batch-size", "2"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert run.returncode == 3, run.stderr  # some images scored and others not, as with unreadable files
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
        assert re.search(r"the backend failed after 2 of 5 images \(.*shutting down.*'stopped' lists the 3 images not "
                         r"scored: once the backend works, run the same command with --resume", errors[0])
        written = json.loads((out / "results.json").read_text())
        assert [Path(entry["source"]).name for entry in written["results"]] == ["f0.png", "f1.png"]
        assert [Path(path).name for path in written["stopped"]["not_scored"]] == ["f2.png", "f3.png", "f4.png"]
        assert sorted(p.name for p in out.glob("*.png")) == ["f0.png", "f1.png"]

        down[0] = False
        run = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "5 scored: " in run.stdout
    written = json.loads((out / "results.json").read_text())
    assert [Path(entry["source"]).name for entry in written["results"]] == [f"f{i}.png" for i in range(5)]
    assert written["stopped"] is None and len(written["resumed"]) == 1
    assert sorted(p.name for p in out.glob("*.png")) == [f"f{i}.png" for i in range(5)]
