"""The edge runtime on a real exported graph in real ONNX Runtime: preprocessing shared with training,
batched scoring against the PyTorch model, maps at each image's size, thresholds, regions, threads."""

from __future__ import annotations

import pickle
import threading
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stmae_edge.checkpoint import load_model
from stmae_edge.errors import BackendError, ConfigError, InvalidImageError
from stmae_edge.models.stmae import STMAEConfig
from stmae_edge.runtime import Detector
from stmae_edge.runtime.devices import cuda_device_count
from stmae_edge.runtime.postprocess import find_regions, image_regions
from stmae_edge.scoring import ScoreStats, Thresholds
from stmae_edge.training.train import preprocessing_for


@pytest.fixture(scope="module")
def detector(tiny_export):
    return Detector(tiny_export[1])


@pytest.fixture(scope="module")
def images(synthetic_dataset, tmp_path_factory):
    """Test images of several sizes, bit depths and channel counts, as files: (paths, arrays)."""
    folder = tmp_path_factory.mktemp("runtime_images")
    sources = sorted((synthetic_dataset / "test").rglob("*.png"))
    paths, arrays = [], []
    for i, src in enumerate(sources):
        image = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
        if i % 3 == 1:
            image = cv2.resize(image, (120, 80))  # not square, not the model's size
        if i % 3 == 2:
            image = (image.astype(np.uint16) * 257)  # 16-bit camera data
        if i % 4 == 3:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        path = folder / f"{i:02d}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
        arrays.append(image)
    return paths, arrays


def test_runtime_and_training_preprocess_files_identically(tiny_export, detector, images):
    _, metadata = load_model(tiny_export[0])
    training = preprocessing_for(STMAEConfig.from_dict(metadata.config), color="gray")  # the synthetic parts are gray
    assert detector.preprocessing == training == metadata.preprocessing
    paths, arrays = images
    from_training = training(paths)  # what train.score_images feeds the network
    np.testing.assert_array_equal(detector.preprocess(paths), from_training)
    np.testing.assert_array_equal(detector.preprocess(arrays), from_training)
    assert {a.dtype for a in arrays} == {np.dtype(np.uint8), np.dtype(np.uint16)}


def test_detector_scores_match_pytorch_and_maps_have_each_images_size(tiny_export, detector, images):
    paths, arrays = images
    model, metadata = load_model(tiny_export[0])
    with torch.inference_mode():
        maps, scores = model(torch.from_numpy(metadata.preprocessing(paths)))
    results = detector.predict(paths)
    assert [r.source for r in results] == [str(p) for p in paths]
    np.testing.assert_allclose([r.score for r in results], scores.numpy(), rtol=1e-4)
    for r, array, model_map in zip(results, arrays, maps[:, 0].numpy(), strict=True):
        assert r.image_size == array.shape[:2] and r.anomaly_map.shape == array.shape[:2]
        expected = cv2.resize(model_map, array.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(r.anomaly_map, expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max()))
        assert r.normalized_score == pytest.approx((r.score - metadata.score_stats.mean) / metadata.score_stats.std,
                                                   rel=1e-4)


def test_one_image_or_a_list_any_batch_size(tiny_export, images):
    paths, arrays = images
    whole = Detector(tiny_export[1], batch_size=32).predict(arrays)
    in_threes = Detector(tiny_export[1], batch_size=3).predict(arrays)
    one = Detector(tiny_export[1]).predict(arrays[4])
    assert not isinstance(one, list) and one.source == "array[0]"
    np.testing.assert_allclose([r.score for r in in_threes], [r.score for r in whole], rtol=1e-5)
    assert one.score == pytest.approx(whole[4].score, rel=1e-5)
    assert Detector(tiny_export[1]).predict([]) == []


def test_raw_maps_takes_what_predict_takes_and_detections_own_their_maps(detector, images):
    paths, arrays = images
    size = detector.preprocessing.input_size
    maps, scores = detector.raw_maps([arrays[0]])
    for one in (arrays[0], paths[0], str(paths[0])):  # one image is a batch of one, not rows or characters
        one_maps, one_scores = detector.raw_maps(one)
        assert one_maps.shape == (1, *size)
        np.testing.assert_allclose(one_scores, scores, rtol=1e-5)
    same_size = np.zeros(size, np.uint8)  # its map is the network's own, unresized
    kept = detector.predict([same_size, same_size])[0]
    assert kept.anomaly_map.shape == size and kept.anomaly_map.base is None  # not a view of the batch's maps
    # the map at the image's own size is made for a caller who reads it (16 MB for a 4-megapixel frame)
    large = detector.predict(np.zeros((3 * size[0], 2 * size[1]), np.uint8))
    assert "_anomaly_map" not in vars(large) and large.model_map.shape == size
    assert large.anomaly_map.shape == (3 * size[0], 2 * size[1]) and large.anomaly_map is large.anomaly_map
    assert pickle.loads(pickle.dumps(large)).anomaly_map.shape == large.anomaly_map.shape
    assert large == replace(large, model_map=large.model_map + 1)  # compared without its maps
    with pytest.raises(ConfigError, match="timings must be a dict"):
        detector.predict(arrays[0], timings=[])


def test_with_return_errors_one_bad_image_costs_only_itself(tiny_export, images):
    paths, arrays = images
    detector = Detector(tiny_export[1], batch_size=4)  # the bad ones fall in different batches
    bad = {1: np.zeros((96, 96, 2), np.uint8), 6: "/nonexistent/frame.png", 7: np.full((96, 96), np.nan, np.float32),
           3: "x" * 5000 + ".png"}  # a name the system refuses (ENAMETOOLONG): it raised a bare OSError
    mixed = [bad.get(i, arrays[i]) for i in range(len(arrays))]
    with pytest.raises(InvalidImageError, match="image 1: "):
        detector.predict(mixed)  # the default: raised
    results = detector.predict(mixed, return_errors=True)
    reference = detector.predict([a for i, a in enumerate(arrays) if i not in bad])
    assert len(results) == len(arrays)
    for i, result in enumerate(results):
        assert isinstance(result, InvalidImageError) == (i in bad)
    assert "image 1: " in str(results[1]) and "/nonexistent/frame.png" in str(results[6])
    assert "cannot be read (File name too long)" in str(results[3])
    good = [r for r in results if not isinstance(r, InvalidImageError)]
    assert [r.source for r in good] == [f"array[{i}]" for i in range(len(arrays)) if i not in bad]
    np.testing.assert_allclose([r.score for r in good], [r.score for r in reference], rtol=1e-5)
    assert isinstance(detector.predict(bad[6], return_errors=True), InvalidImageError)  # one image: returned
    assert detector.predict([bad[1], bad[6]], return_errors=True)[1].args  # all bad: nothing is run
    with pytest.raises(ConfigError, match="return_errors"):
        detector.predict(arrays[0], return_errors="yes")
    for not_images in (5, {"a": arrays[0]}):  # preprocess took the rule of its own: a TypeError, a dict's keys
        with pytest.raises(InvalidImageError, match="image 0: "):
            detector.preprocess(not_images)
    assert detector.preprocess(arrays[:2]).shape[0] == 2 and detector.preprocess(arrays[0]).shape[0] == 1


def test_thresholds_come_from_metadata_and_can_be_overridden_per_call(detector, images):
    arrays = images[1]
    stats, default = detector.score_stats, detector.metadata.thresholds
    assert detector.thresholds == default
    results = detector.predict(arrays)
    assert all(r.image_threshold == default.image and r.is_anomalous == (r.score > default.image) for r in results)
    middle = float(np.median([r.score for r in results]))
    # The tiny model has a score head, as the default: the map has statistics of its own (its held-out
    # maxima), and the default pixel threshold is the same rule on them.
    map_stats = detector.map_stats
    assert detector.metadata.map_stats == map_stats != stats
    assert default.pixel == pytest.approx(map_stats.mean + 3 * map_stats.std)
    maxima = detector.raw_maps(arrays)[0].reshape(len(arrays), -1).max(axis=1)
    map_middle = float(np.median(maxima))
    moved = detector.predict(arrays, image_threshold=middle, pixel_threshold=map_middle)
    assert sum(r.is_anomalous for r in moved) == sum(r.score > middle for r in results) > 0
    # regions follow the pixel threshold; a failed image under it everywhere gets where its map is highest
    assert [any(g.above_pixel_threshold for g in r.regions) for r in moved] == list(maxima > map_middle)
    # With the pixel threshold over every map, each failed image points at its map's highest point
    over_all = detector.predict(arrays, image_threshold=middle, pixel_threshold=float(maxima.max()) + 1)
    pointed = [r for r in over_all if r.regions]
    assert pointed and [r.is_anomalous for r in pointed] == [True] * len(pointed)
    assert [bool(r.regions) for r in over_all] == [r.is_anomalous and m > map_stats.mean
                                                  for r, m in zip(over_all, maxima, strict=True)]
    for r, m in zip(over_all, maxima, strict=True):
        if r.regions:
            (region,) = r.regions
            assert not region.above_pixel_threshold and region.peak_score == pytest.approx(m, rel=1e-4)
    by_sigma = detector.predict(arrays[0], sigma=0.5)
    assert by_sigma.image_threshold == pytest.approx(stats.mean + 0.5 * stats.std)
    assert by_sigma.pixel_threshold == pytest.approx(map_stats.mean + 0.5 * map_stats.std)
    with pytest.raises(ConfigError, match="sigma"):  # below the good mean: refused, as `threshold` refuses it
        detector.predict(arrays[0], sigma=-2.0)
    assert detector.thresholds == default  # per-call overrides leave the detector as it was
    try:
        detector.thresholds = Thresholds(image=middle, pixel=middle, rule="line 3 setting")
        assert detector.predict(arrays[0]).image_threshold == middle
    finally:
        detector.thresholds = default


def test_a_failed_image_under_the_pixel_threshold_gets_the_region_where_its_map_is_highest():
    stats = ScoreStats(count=10, mean=1.0, std=0.5, min=0.0, max=2.0, p50=1.0, p95=1.8, p99=1.9)
    thresholds = Thresholds(image=3.0, pixel=4.0)
    anomaly_map = np.zeros((60, 90), np.float32)
    anomaly_map[10:20, 30:45] = 2.0
    anomaly_map[14, 40] = 3.5  # the highest point, under the pixel threshold
    anomaly_map[40:43, 5:7] = 3.0  # a second, lower blob: not reported
    (region,) = image_regions(anomaly_map, thresholds, True, stats, (60, 90))
    assert not region.above_pixel_threshold and region.to_dict()["above_pixel_threshold"] is False
    assert region.box == (30, 10, 15, 10) and (region.peak_score, region.peak_x, region.peak_y) == (3.5, 40, 14)
    assert image_regions(anomaly_map, thresholds, False, stats, (60, 90)) == ()  # a pass: nothing to point at
    assert image_regions(np.full((60, 90), 0.9, np.float32), thresholds, True, stats, (60, 90)) == ()  # nowhere above a good part
    anomaly_map[50:52, 70:72] = 5.0  # over the pixel threshold: the usual regions, and only those
    regions = image_regions(anomaly_map, thresholds, True, stats, (60, 90))
    assert [r.box for r in regions] == [(70, 50, 2, 2)] and regions[0].above_pixel_threshold


def test_regions_are_connected_components_with_box_area_and_peak():
    stats = ScoreStats(count=10, mean=1.0, std=0.5, min=0.0, max=2.0, p50=1.0, p95=1.8, p99=1.9)
    anomaly_map = np.zeros((60, 90), np.float32)
    anomaly_map[10:20, 30:45] = 3.0
    anomaly_map[14, 40] = 5.0
    anomaly_map[40:43, 5:7] = 2.5
    anomaly_map[50, 80] = 2.2  # a single pixel, dropped by min_area=2
    regions = find_regions(anomaly_map, 2.0, stats, (60, 90), min_area=2)
    assert [r.box for r in regions] == [(30, 10, 15, 10), (5, 40, 2, 3)]
    assert [r.area for r in regions] == [150, 6]
    assert (regions[0].peak_score, regions[0].peak_x, regions[0].peak_y) == (5.0, 40, 14)
    assert regions[0].peak_normalized == pytest.approx(8.0)
    assert len(find_regions(anomaly_map, 2.0, stats, (60, 90))) == 3
    assert find_regions(anomaly_map, 10.0, stats, (60, 90)) == ()
    # an image twice the model's size in height, three times in width: boxes, areas and peaks scale
    scaled = find_regions(anomaly_map, 2.0, stats, (120, 270), min_area=2)
    assert [r.box for r in scaled] == [(90, 20, 45, 20), (15, 80, 6, 6), (240, 100, 3, 2)]
    assert [r.area for r in scaled] == [900, 36, 6] and (scaled[0].peak_x, scaled[0].peak_y) == (121, 29)


@pytest.mark.parametrize("size", [(128, 128), (64, 64), (1, 1), (3, 200)])
def test_an_image_smaller_than_the_model_fails_exactly_when_it_has_a_region(detector, size):
    """Regions of a small image cover less than one of its pixels each; they must still be reported."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size, dtype=np.uint8)
    maps, scores = detector.raw_maps([image])

    def just_below(value) -> float:  # a few model pixels above it
        return float(value) - 1e-4 * max(1.0, abs(float(value)))

    detector = Detector(detector.model_path, "ort-cpu", check_size=False)  # far smaller than the training images
    for image_threshold, pixel_threshold in ((just_below(scores[0]), just_below(maps[0].max())), (-1e9, -1e9)):
        result = detector.predict(image, image_threshold=image_threshold, pixel_threshold=pixel_threshold)
        assert result.is_anomalous and result.regions, (size, pixel_threshold)
        assert all(r.area >= 1 and r.width >= 1 and r.height >= 1 for r in result.regions)
        assert all(0 <= r.x < size[1] and 0 <= r.y < size[0] for r in result.regions)
    high = detector.predict(image, image_threshold=1e9, pixel_threshold=1e9)
    assert not high.is_anomalous and high.regions == ()


@pytest.mark.parametrize("bits", [10, 12])
def test_mono10_and_mono12_frames_score_as_their_8_bit_equivalents(tiny_export, detector, images, bits):
    eight_bit = [a for a in images[1] if a.dtype == np.uint8]
    top = (1 << bits) - 1
    frames = [np.round(a.astype(np.float64) * top / 255).astype(np.uint16) for a in eight_bit]
    expected = np.array([r.score for r in detector.predict(eight_bit)])
    camera = Detector(tiny_export[1], bit_depth=bits)
    # The tiny model scores, as the default, in z-scores on its held-out good images (near 0 for good
    # parts, so a relative tolerance alone means nothing there): within a twentieth of their spread.
    np.testing.assert_allclose([r.score for r in camera.predict(frames)], expected, rtol=1e-2, atol=0.05)
    # Read as full-range 16-bit data the same frames are nearly black: scores that mean nothing.
    assert not np.allclose([r.score for r in detector.predict(frames)], expected, rtol=1e-2, atol=0.05)
    too_bright = frames[0].copy()
    too_bright[0, 0] = top + 1
    with pytest.raises(InvalidImageError, match=f"exceed the {bits}-bit range"):
        camera.predict([frames[1], too_bright])
    assert camera.predict(frames[0]).score == pytest.approx(expected[0], rel=1e-2, abs=0.05)  # still usable
    with pytest.raises(ConfigError, match="bit depth"):
        Detector(tiny_export[1], bit_depth=8)


def test_detector_is_safe_to_share_between_threads(detector, images):
    arrays = images[1]
    expected = [r.score for r in detector.predict(arrays)]
    results: dict[int, list[float]] = {}

    def work(k: int) -> None:
        order = np.random.default_rng(k).permutation(len(arrays))
        got = {int(i): detector.predict(arrays[i]).score for i in order}
        results[k] = [got[i] for i in range(len(arrays))]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for scores in results.values():
        np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_backend_choice_is_reported_and_never_a_silent_fallback(tiny_export):
    onnx_file = tiny_export[1]
    auto = Detector(onnx_file).info
    assert auto["backend"] in ("ort-cpu", "ort-cuda") and auto["provider"] in ("CPUExecutionProvider",
                                                                              "CUDAExecutionProvider")
    assert Detector(onnx_file, "ort-cpu").info["provider"] == "CPUExecutionProvider"
    if cuda_device_count() == 0:
        assert auto["backend"] == "ort-cpu" and auto["device"].startswith("CPU")
        for backend, provider in (("ort-cuda", "CUDAExecutionProvider"), ("ort-tensorrt", "TensorrtExecutionProvider")):
            # onnxruntime-gpu without a GPU: the provider fails to start; CPU onnxruntime: it has none
            with pytest.raises(BackendError, match=f"(could not start|build has no) {provider}.*ort-cpu"):
                Detector(onnx_file, backend)
        assert not list(onnx_file.parent.glob("*.ort-tensorrt-cache*"))  # no empty cache left beside the model
    with pytest.raises(ConfigError, match="unknown backend"):
        Detector(onnx_file, "openvino")
    with pytest.raises(ConfigError, match="ONNX file"):
        Detector(onnx_file, "tensorrt")
    with pytest.raises(ConfigError, match="CUDA graphs"):
        Detector(onnx_file, cuda_graph=True)


def test_onnx_runtime_threads_wait_unless_asked_to_spin(tiny_export, images):
    """Spinning threads take the host's cores between frames (docs/BENCHMARKS.md); same results either way."""
    key = "session.intra_op.allow_spinning"
    waiting, spinning = Detector(tiny_export[1]), Detector(tiny_export[1], spin_threads=True)
    assert waiting._backend.session.get_session_options().get_session_config_entry(key) == "0"
    assert spinning._backend.session.get_session_options().get_session_config_entry(key) == "1"
    arrays = images[1]
    assert [d.score for d in waiting.predict(arrays)] == [d.score for d in spinning.predict(arrays)]
    with pytest.raises(ConfigError, match="spin_threads 'yes' must be True or False"):
        Detector(tiny_export[1], spin_threads="yes")


@pytest.mark.skipif(cuda_device_count() > 0 or "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu on a machine where its CUDA provider cannot start (no GPU)")
def test_auto_passes_over_a_gpu_that_cannot_run_the_file_and_says_so(tiny_export, monkeypatch, caplog):
    """A GPU driver without the CUDA libraries ONNX Runtime needs (this machine's own provider failing to
    start, the GPU's presence pretended): auto runs on the CPU, with a warning; a named backend fails."""
    import stmae_edge.runtime.backends as backends

    monkeypatch.setattr(backends, "device_present", lambda name: True)
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.backends"):
        detector = Detector(tiny_export[1])
    assert detector.info["backend"] == "ort-cpu" and detector.info["provider"] == "CPUExecutionProvider"
    assert "backend auto: ort-cuda cannot run" in caplog.text and "trying ort-cpu" in caplog.text
    with pytest.raises(BackendError, match="could not start CUDAExecutionProvider"):
        Detector(tiny_export[1], "ort-cuda")


def test_pytorch_checkpoint_runs_as_a_comparison_backend(tiny_export, detector, images):
    arrays = images[1]
    eager = Detector(tiny_export[0])
    assert eager.info["backend"] == "torch-cpu" and "PyTorch" in eager.info["provider"]
    np.testing.assert_allclose([r.score for r in eager.predict(arrays)],
                               [r.score for r in detector.predict(arrays)], rtol=1e-4)


def test_bad_thresholds_and_non_images_are_typed_errors(tiny_export, detector):
    image = np.random.default_rng(0).integers(0, 256, (80, 100), np.uint8)
    for kwargs in ({"image_threshold": float("nan")}, {"pixel_threshold": float("inf")}, {"sigma": float("nan")},
                   {"image_threshold": "high"}):
        with pytest.raises(ConfigError, match="finite number"):
            detector.predict(image, **kwargs)
    with pytest.raises(ConfigError, match="Thresholds"):
        detector.thresholds = 5.0
    for item in (None, b"raw bytes", 3.5):
        with pytest.raises(InvalidImageError, match="not an image"):
            detector.predict([image, item])
        with pytest.raises(InvalidImageError, match="not an image"):
            detector.predict(item)
    batch = detector.predict(np.stack([image, image[::-1]])[..., None])  # a 4-d array (N, H, W, C) is a batch too
    assert len(batch) == 2 and batch[0].score == pytest.approx(detector.predict(image).score, rel=1e-5)
    with pytest.raises(InvalidImageError, match=r"float pixels range 0..255"):
        detector.predict(np.linspace(0, 255, 80 * 100, dtype=np.float32).reshape(80, 100))
    assert detector.predict(np.float32(image) / 255).score == pytest.approx(detector.predict(image).score, rel=1e-5)
    closed = Detector(tiny_export[1])
    closed.close()
    closed.close()  # twice is fine
    with pytest.raises(BackendError, match="closed"):
        closed.predict(image)
    with pytest.raises(BackendError, match="this Detector was closed"):  # not entered as if it were open
        with closed:
            pass


def test_a_keep_aspect_model_lays_its_maps_over_each_image_in_every_path(tiny_export, images, tmp_path):
    """The tiny model with `keep_aspect`: the runtime, the PyTorch scoring that training and evaluate use,
    and a region's box all place the map over the image (Preprocessing.to_image_frame), not over the
    letterboxed input. The Detector runs the checkpoint (its PyTorch backend): the map is framed in the
    Detector, the same code for every backend, and exporting costs CI half a minute."""
    from dataclasses import replace

    from stmae_edge.checkpoint import save_checkpoint
    from stmae_edge.training.train import score_images

    model, metadata = load_model(tiny_export[0])
    metadata.preprocessing = replace(metadata.preprocessing, keep_aspect=True)
    save_checkpoint(tmp_path / "keep.pt", model, metadata)
    keep = Detector(tmp_path / "keep.pt")
    assert keep.preprocessing.keep_aspect
    paths, arrays = images
    torch_maps, torch_scores = score_images(model, keep.preprocessing, paths)
    maps, scores = keep.raw_maps(paths)
    np.testing.assert_allclose(scores, torch_scores, rtol=1e-4)
    np.testing.assert_allclose(maps, torch_maps, rtol=1e-3, atol=1e-3 * float(np.abs(torch_maps).max()))
    with torch.inference_mode():
        network, _ = model(torch.from_numpy(keep.preprocessing(arrays[1:2])))
    top, left, height, width = keep.preprocessing.content_box(*arrays[1].shape[:2])
    assert (height, width) != (64, 64)  # a 120x80 image: letterboxed, not stretched
    box = network[0, 0, top:top + height, left:left + width].numpy()
    result = keep.predict(arrays[1])
    expected = cv2.resize(cv2.resize(box, (64, 64)), arrays[1].shape[1::-1])
    np.testing.assert_allclose(result.anomaly_map, expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max()))
    low = keep.predict(arrays[1], pixel_threshold=float(np.quantile(expected, 0.9)))
    assert low.regions and all(0 <= r.x and r.x + r.width <= 120 and 0 <= r.y and r.y + r.height <= 80
                               for r in low.regions)


def test_auto_warns_where_a_gpu_is_here_and_onnx_runtime_is_the_cpu_build(tiny_export, monkeypatch, caplog):
    """A Jetson's pip install brings the CPU-only onnxruntime: an .onnx file then runs on the ARM CPU
    beside an idle GPU, which must be a warning that says what to install, not an info line."""
    from types import SimpleNamespace

    import stmae_edge.runtime.backends as backends

    monkeypatch.setattr(backends, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(backends, "import_onnxruntime",
                        lambda: SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"]))
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.backends"):
        assert backends.choose_backend(tiny_export[1], "auto") == "ort-cpu"
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "a CUDA GPU is here, but this ONNX Runtime has no CUDAExecutionProvider" in warned[0].getMessage()
    assert "onnxruntime-gpu" in warned[0].getMessage() and "stmae-edge build" in warned[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(backends, "cuda_device_count", lambda: 0)  # no GPU: the CPU is the right choice, said quietly
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.backends"):
        assert backends.choose_backend(tiny_export[1], "auto") == "ort-cpu"
    assert not caplog.records


def test_the_cpu_is_named_by_its_board_where_cpuinfo_names_no_model(monkeypatch, tmp_path):
    """ARM's /proc/cpuinfo (a Jetson's) has no "model name" line: the device tree names the board."""
    from stmae_edge import machine
    from stmae_edge.runtime import devices

    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 62.50\nCPU implementer\t: 0x41\nCPU part\t: 0xd42\n")
    board = tmp_path / "model"
    board.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    monkeypatch.setattr(devices, "CPUINFO", arm)
    monkeypatch.setattr(machine, "DEVICE_TREE_MODEL", board)
    monkeypatch.setattr(devices.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(devices.platform, "processor", lambda: "")
    assert devices.cpu_description().startswith("CPU: NVIDIA Jetson AGX Orin Developer Kit (aarch64) (")
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\n")
    monkeypatch.setattr(devices, "CPUINFO", x86)
    assert devices.cpu_description().startswith("CPU: AMD EPYC 9B14 (")
    import os

    # macOS: no /proc/cpuinfo, and platform.processor() says only "arm"; sysctl names the chip
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "sysctl").write_text("#!/bin/sh\n[ \"$2\" = machdep.cpu.brand_string ] && echo 'Apple M2 Pro'\n")
    (tools / "sysctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(devices.sys, "platform", "darwin")
    monkeypatch.setattr(devices.platform, "processor", lambda: "arm")
    assert devices.cpu_description().startswith("CPU: Apple M2 Pro (")


def test_detections_compare_and_hash_without_their_maps_and_take_numpy_thresholds(tiny_export, tmp_path):
    """An integrator's `a == b`, `a in seen` or a set of results raised on the map (an array's truth
    value); a numpy threshold per call reached to_dict() as numpy and broke json.dumps."""
    import json

    detector = Detector(tiny_export[1])
    frame = np.full((96, 96), 120, np.uint8)
    a, b = detector.predict(frame), detector.predict(frame)
    assert a == b and a in [b] and len({a, b}) == 1
    assert a != detector.predict(np.full((96, 96), 30, np.uint8))
    chosen = detector.predict(frame, image_threshold=np.float32(5), pixel_threshold=np.float64(4))
    record = json.loads(json.dumps(chosen.to_dict()))
    assert record["image_threshold"] == 5.0 and record["pixel_threshold"] == 4.0
    for region in record["regions"]:
        assert region["peak"] == [region["peak_x"], region["peak_y"]]
    import shutil

    from stmae_edge.model_files import write_thresholds
    from stmae_edge.scoring import Thresholds

    copy = Path(shutil.copy(tiny_export[1], tmp_path / "m.onnx"))  # kept in the file: a numpy value too
    write_thresholds(copy, Thresholds(image=np.float32(18), pixel=np.float32(15), rule="from numpy"))
    assert Detector(copy).thresholds.image == 18.0


def test_a_broken_onnx_file_is_its_own_fault_not_the_gpus(tmp_path, monkeypatch, caplog):
    """auto passes a backend that cannot start on to the next one; a file that is not a readable graph
    fails the same way on each, so it is refused once, as the file's fault, without 'trying ort-cpu'."""
    import stmae_edge.runtime.backends as backends
    from stmae_edge.errors import CheckpointError

    broken = tmp_path / "m.onnx"
    broken.write_bytes(b"half a graph")
    monkeypatch.setattr(backends, "device_present", lambda name: True)  # auto would try the GPU first
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.backends"):
        with pytest.raises(CheckpointError, match="not a readable ONNX file"):
            Detector(broken)
    assert "trying" not in caplog.text, caplog.text


def test_an_overlays_picture_of_an_8_bit_image_is_its_own_pixels():
    """8-bit images skip the float round trip (30x faster per overlay); the bytes must be the same."""
    from stmae_edge.preprocessing import to_rgb_float
    from stmae_edge.runtime.overlay import display_image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (37, 23), dtype=np.uint8)
    bgra = rng.integers(0, 256, (19, 31, 4), dtype=np.uint8)
    for image in (gray, gray[:, :, None], gray[:, :1], gray[::2, ::-1], bgra, bgra[:, :, :3], bgra[:, ::3, :3]):
        shown = display_image(image)
        by_floats = np.rint(to_rgb_float(image)[:, :, ::-1] * 255).clip(0, 255).astype(np.uint8)
        assert shown.dtype == np.uint8 and shown.flags.c_contiguous and np.array_equal(shown, by_floats)
        assert not np.shares_memory(shown, image)  # a picture to draw on, not the caller's frame
    deep = (gray.astype(np.uint16) * 257)[:, :, None]  # other depths: the float path, rounded (it cut 1 off some)
    assert np.array_equal(display_image(deep), display_image(gray))


def test_the_cuda_driver_is_told_apart_missing_without_a_gpu_and_failing(monkeypatch):
    """A plan's error says which: no driver, a driver that sees no GPU (both: run the .onnx), or a
    driver that fails (after an upgrade without a reboot: cuda-python's error, about the driver). The
    driver is loaded as libcuda.so.1 first, as cuda-python loads it: find_library may name the
    toolkit's stub, which sees no GPU. No GPU here: the library is stood in for."""
    import os
    from types import SimpleNamespace

    from stmae_edge.runtime import devices

    tried = []

    def loader(answer):
        def load(name):
            tried.append(name)
            if answer is None:
                raise OSError(f"{name}: cannot open shared object file")
            return SimpleNamespace(cuInit=lambda flags: answer, cuDeviceGetCount=lambda out: 0)
        return load

    for answer, state in ((None, "missing"), (100, "no GPU"), (803, "error 803"), (0, "ok")):
        tried.clear()
        monkeypatch.setattr(devices.ctypes, "CDLL", loader(answer))
        assert devices.cuda_driver_state() == state
        if os.name != "nt":
            assert tried[0] == "libcuda.so.1"


def test_auto_warns_when_a_failing_cuda_driver_sends_it_to_the_cpu(tiny_export, monkeypatch, caplog):
    """A driver that fails (error 804: upgraded without a reboot) counts no GPU, and auto's only word was
    an INFO line, hidden by default: a line PC with a GPU ran on its CPU, unsaid. The library is stood in for."""
    from types import SimpleNamespace

    from stmae_edge.runtime import backends, devices

    for answer, level in ((804, "WARNING"), (100, "INFO")):
        monkeypatch.setattr(devices.ctypes, "CDLL", lambda name, answer=answer: SimpleNamespace(
            cuInit=lambda flags: answer, cuDeviceGetCount=lambda out: 0))
        caplog.clear()
        with caplog.at_level("INFO", logger="stmae_edge.runtime.backends"):
            assert backends.choose_backend(tiny_export[1], "auto") == "ort-cpu"
        said = [record for record in caplog.records if "backend auto: ort-cpu for m.onnx" in record.getMessage()]
        assert [record.levelname for record in said] == [level]
        assert ("the CUDA driver fails (cuInit error 804" in said[0].getMessage()) == (answer == 804)


def test_autos_fallback_reads_and_checks_the_graph_once(tiny_export, monkeypatch, caplog):
    """Every provider auto tried read the whole graph again for its external-data check and facts
    (0.3 s for the default's): once per open now. A GPU is pretended, whose CUDA provider cannot start."""
    from stmae_edge.runtime import backends

    reads = []
    real = backends.load_onnx
    monkeypatch.setattr(backends, "load_onnx", lambda *a, **k: (reads.append(a[0]), real(*a, **k))[1])
    monkeypatch.setattr(backends, "device_present", lambda name: True)  # auto starts with a GPU provider
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.backends"):
        detector = Detector(tiny_export[1])  # the GPU providers fail here: no CUDA
    assert detector.info["backend"] == "ort-cpu" and "ort-cuda cannot run m.onnx here" in caplog.text
    assert len(reads) == 1


def test_a_model_without_its_training_sizes_is_warned_of(tiny_export, caplog):
    """The check that refuses a frame from a wrongly set camera is off for a model made before sizes were
    recorded: that was an INFO line, hidden by default."""
    from dataclasses import replace

    from stmae_edge.metadata import ModelMetadata
    from stmae_edge.runtime.detector import accepted_sizes

    older = replace(ModelMetadata.from_onnx(tiny_export[1]), trained_sizes=None)
    with caplog.at_level("INFO", logger="stmae_edge.runtime.detector"):
        assert accepted_sizes(older, check_size=True) is None
        assert accepted_sizes(older, check_size=False) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "train it again" in caplog.text
