"""The model families a checkpoint can hold, by the name recorded in its metadata.

Every family maps preprocessed images (N, 3, H, W) to anomaly maps (N, 1, H, W) and scores (N,) in
one forward pass, so export, calibration, engines and the runtime treat them alike; only training
and the architecture differ.
"""

from __future__ import annotations

import logging

from torch import nn

from ..errors import ConfigError
from ..metadata import FAMILIES, STMAE_FAMILY  # noqa: F401 - the names (torch-free in metadata.py), by their family
from . import filtering_ae, stmae

logger = logging.getLogger(__name__)



def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def preset_config(family: str, name: str, backbone: str | None = None):
    """A size preset of a family; `backbone` overrides ST-MAE's backbone (the filtering AE has none)."""
    if check_family(family) == filtering_ae.FAMILY:
        if backbone:
            raise ConfigError(f"the {family} model works on the image itself and has no backbone; "
                              "drop --backbone")
        return filtering_ae.preset(name)
    overrides = {}
    if backbone:
        from .backbones import DEFAULT_LAYERS

        if backbone not in DEFAULT_LAYERS:
            raise ConfigError(f"unknown backbone {backbone!r}; use one of {', '.join(DEFAULT_LAYERS)}")
        overrides = {"backbone": backbone, "layers": DEFAULT_LAYERS[backbone]}
        if stmae.PRESETS.get(name) and stmae.PRESETS[name].score_layers:
            score_layers = stmae.SCORE_LAYERS.get(backbone, ())
            if not score_layers:
                logger.warning("no score head has been measured for the %s backbone: the image score is the "
                               "map's maximum", backbone)
            overrides["score_layers"] = score_layers
    return stmae.preset(name, **overrides)


def config_from_dict(family: str, d: dict):
    if check_family(family) == filtering_ae.FAMILY:
        return filtering_ae.FilteringAEConfig.from_dict(d)
    return stmae.STMAEConfig.from_dict(d)


def build_model(family: str, config, backbone_weights: str = "none") -> nn.Module:
    """An untrained network of the family; `backbone_weights` is ST-MAE's frozen backbone
    ("none" when a checkpoint's weights follow)."""
    if check_family(family) == filtering_ae.FAMILY:
        return filtering_ae.FilteringAutoencoder(config)
    return stmae.STMAE(config, backbone_weights=backbone_weights)
