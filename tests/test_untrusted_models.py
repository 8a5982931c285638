"""Model files are a security boundary: an ONNX file whose tensors read data from outside its folder,
metadata that is huge, deeply nested or of the wrong types, and a plan paired with another model's
sidecar are refused with one line, before anything runs."""

from __future__ import annotations

import json
import re

import onnx
import pytest
from onnx import TensorProto
from test_cli import _assert_one_line_error, run

from stmae_edge.checks import MAX_DOCUMENT_BYTES
from stmae_edge.errors import CheckpointError, StmaeError
from stmae_edge.metadata import ONNX_METADATA_KEY, ModelMetadata
from stmae_edge.runtime import Detector


def _with_external_weight(source, target, location: str) -> None:
    """A copy of a real export whose first initializer takes its bytes from `location`."""
    proto = onnx.load(str(source))
    tensor = next(t for t in proto.graph.initializer if t.raw_data)
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname", "sub/../../secret.bin"])
def test_an_onnx_file_reading_data_from_outside_its_folder_is_refused(tiny_export, tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(bytes(1 << 20))
    folder = tmp_path / "models"
    folder.mkdir()
    evil = folder / "evil.onnx"
    _with_external_weight(tiny_export[1], evil, location)
    with pytest.raises(CheckpointError, match="outside the model's folder"):
        ModelMetadata.from_onnx(evil)
    for command in (["build", str(evil)], ["calibrate", str(evil), "--out", str(tmp_path / "q.onnx")],
                    ["evaluate", str(evil), str(tmp_path)]):
        _assert_one_line_error(run(*command), "outside the model's folder")
    # and before ONNX Runtime opens it: versions before 1.24 (the floor is 1.18) read such paths as given
    with pytest.raises(StmaeError, match="outside the model's folder"):
        Detector(evil, "ort-cpu")


def test_external_data_inside_the_folder_is_accepted(tiny_export, tmp_path):
    source = onnx.load(str(tiny_export[1]))
    onnx.save(source, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.weights")
    assert ModelMetadata.from_onnx(tmp_path / "m.onnx").model_hash == ModelMetadata.from_onnx(tiny_export[1]).model_hash
    assert Detector(tmp_path / "m.onnx", "ort-cpu").metadata.model_hash


def test_a_tensor_marked_external_that_carries_its_own_bytes_is_refused_and_nothing_is_written(
        tiny_export, synthetic_dataset, tmp_path):
    """onnx.save writes such a tensor's bytes to its location: `threshold --write` rewriting the model
    would append to, or create, any file beside it (a shell profile in a home folder)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n")
    proto = onnx.load(str(tiny_export[1]))
    for name, location in (("append", "victim.txt"), ("create", "created.sh")):
        payload = b"echo WRITTEN-BY-A-MODEL-FILE\n"
        tensor = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[len(payload)], raw_data=payload)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(victim.stat().st_size)), ("length", str(len(payload)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        proto.graph.initializer.append(tensor)
    crafted = tmp_path / "model.onnx"
    crafted.write_bytes(proto.SerializeToString())
    with pytest.raises(CheckpointError, match="marked as external data but carries its own"):
        ModelMetadata.from_onnx(crafted)
    r = run("threshold", str(crafted), str(synthetic_dataset), "--sigma", "3", "--write")
    _assert_one_line_error(r, "marked as external data but carries its own")
    assert victim.read_text() == "a user's file\n" and not (tmp_path / "created.sh").exists()


def test_write_thresholds_keeps_a_models_own_external_data_as_it_is(tiny_export, tmp_path):
    from stmae_edge.model_files import write_thresholds
    from stmae_edge.scoring import Thresholds

    onnx.save(onnx.load(str(tiny_export[1])), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.weights")
    weights = (tmp_path / "m.weights").read_bytes()
    write_thresholds(tmp_path / "m.onnx", Thresholds(image=7.0, pixel=5.0, rule="set by hand"))
    assert (tmp_path / "m.weights").read_bytes() == weights and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.onnx", "m.weights"]
    detector = Detector(tmp_path / "m.onnx", "ort-cpu")
    assert (detector.thresholds.image, detector.thresholds.pixel) == (7.0, 5.0)


def _with_metadata(source, target, text: str) -> None:
    proto = onnx.load(str(source))
    for prop in proto.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            prop.value = text
    onnx.save(proto, str(target))


def test_metadata_that_is_huge_deeply_nested_or_of_the_wrong_types_is_refused(tiny_export, synthetic_dataset, tmp_path):
    good = ModelMetadata.from_onnx(tiny_export[1]).to_dict()
    huge = dict(good, training={"notes": "x" * (MAX_DOCUMENT_BYTES + 1)})
    cases = {
        "huge": (json.dumps(huge), "more than"),
        "deep": (json.dumps(good)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON|nests deeper"),
        "nested 40": (json.dumps(dict(good, training={"x": json.loads("[" * 40 + "1" + "]" * 40)})), "nests deeper"),
        "a list": ("[1, 2]", "not an object"),
        "stats as text": (json.dumps(dict(good, score_stats="high")), "malformed"),
        "negative std": (json.dumps(dict(good, score_stats=dict(good["score_stats"], std=-1.0))), "must be positive"),
        "NaN threshold": (json.dumps(dict(good, thresholds=dict(good["thresholds"], image=float("nan")))), "finite"),
        # the part edited by hand: how to mend it, not to retrain
        "quoted threshold": (json.dumps(dict(good, thresholds=dict(good["thresholds"], pixel="2.5"))),
                             "'thresholds' is malformed \\(the pixel threshold is a str, not a number\\): give 'image' "
                             "and 'pixel' as numbers"),
        "input size 1e9": (json.dumps(dict(good, preprocessing=dict(good["preprocessing"], input_size=[10**9, 10**9]))),
                           "input size"),
        "unknown key": (json.dumps(dict(good, preprocessing=dict(good["preprocessing"], colour_space="lab"))), "malformed"),
    }
    for name, (text, fragment) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.onnx"
        _with_metadata(tiny_export[1], path, text)
        with pytest.raises(StmaeError, match=fragment):
            Detector(path, "ort-cpu")
        if name in ("huge", "deep", "stats as text"):  # and the command line says it in one line
            r = run("evaluate", str(path), str(synthetic_dataset), "--out", str(tmp_path / "e.json"))
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (name, r.stderr)
            assert re.search(fragment, r.stderr), (name, r.stderr)  # refused for its metadata, not for anything else


def test_an_external_data_location_that_is_not_a_path_is_refused(tiny_export, tmp_path):
    evil = tmp_path / "nul.onnx"
    _with_external_weight(tiny_export[1], evil, "weights\x00.bin")
    with pytest.raises(CheckpointError, match="outside the model's folder"):
        ModelMetadata.from_onnx(evil)


def test_external_data_is_checked_in_the_folder_readers_look_in_not_where_a_link_points(tiny_export, tmp_path):
    """ONNX Runtime reads a linked model's external data beside the link. Checked beside the link's
    target instead, a folder link next to the link (`d` -> anywhere) would pass unseen."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(bytes(1 << 20))
    store, models = tmp_path / "store", tmp_path / "models"
    (store / "d").mkdir(parents=True)  # a real folder of that name where the link points
    models.mkdir()
    _with_external_weight(tiny_export[1], store / "evil.onnx", "d/secret.bin")
    (models / "evil.onnx").symlink_to(store / "evil.onnx")
    (models / "d").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the model's folder"):
        ModelMetadata.from_onnx(models / "evil.onnx")


@pytest.mark.parametrize("entry,value", [("data_dir", ["/data"]), ("train_config", "epochs 40"),
                                         ("train_images", True), ("seconds", "12")])
def test_a_training_record_entry_the_package_reads_back_must_have_its_type(tiny_export, tmp_path, entry, value):
    good = ModelMetadata.from_onnx(tiny_export[1]).to_dict()
    path = tmp_path / "record.onnx"
    _with_metadata(tiny_export[1], path, json.dumps(dict(good, training=dict(good["training"], **{entry: value}))))
    with pytest.raises(CheckpointError, match=f"'training' entry '{entry}' is a {type(value).__name__}, not a"):
        Detector(path, "ort-cpu")
    if entry == "data_dir":  # what calibrate would have read as a folder
        _assert_one_line_error(run("calibrate", str(path), "--out", str(tmp_path / "q.onnx")), "'training' entry")


def test_a_threshold_rule_reaches_terminals_without_control_characters_and_within_bounds():
    from stmae_edge.scoring import MAX_RULE_CHARS, Thresholds

    rule = Thresholds.from_dict({"image": 1.0, "pixel": 1.0, "rule": "mean\x1b]0;owned\x07 + 3 std\r\n" * 1000}).rule
    assert rule.startswith("mean ]0;owned  + 3 std  ") and len(rule) == MAX_RULE_CHARS
    assert all(ch.isprintable() for ch in rule)


def test_name_scopes_are_read_as_text_never_evaluated(tiny_export):
    from stmae_edge.engines.half_precision import NAME_SCOPES_KEY, scoring_nodes

    proto = onnx.load(str(tiny_export[1]))
    assert scoring_nodes(proto)  # the exporter's own records are read
    nodes = list(proto.graph.node)[:4]
    for node in nodes:
        del node.metadata_props[:]
    for node, text in zip(nodes, ["['', 'scoring']", "[" * 3000 + "]" * 3000, "['', 'scoring'] + [().__class__]",
                                  "('', 'scoring')"], strict=True):
        entry = node.metadata_props.add()
        entry.key, entry.value = NAME_SCOPES_KEY, text
    found = scoring_nodes(proto)
    assert nodes[0].name in found and not {n.name for n in nodes[1:]} & found


def test_an_earlier_runs_results_file_that_is_huge_or_nested_deep_is_left_alone(tmp_path, monkeypatch, caplog):
    from stmae_edge.runtime import files

    results = tmp_path / "results.json"
    results.write_text('{"results": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert files.overlays_listed_in(results) == {}
    results.write_text(json.dumps({"results": [{"overlay": "a.png", "overlay_sha256": "0" * 64}]}))
    assert files.overlays_listed_in(results) == {"a.png": "0" * 64}
    monkeypatch.setattr(files, "MAX_RESULTS_BYTES", 16)
    assert files.overlays_listed_in(results) == {}
    assert "larger than 16 bytes" in caplog.text
