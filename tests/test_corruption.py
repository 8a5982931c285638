"""The synthetic-defect generator for self-supervised training: seeded, varied, and honest about
which pixels it changed."""

from __future__ import annotations

import collections

import cv2
import numpy as np
import pytest
from conftest import texture

from stmae_edge.errors import ConfigError
from stmae_edge.preprocessing import to_float
from stmae_edge.training.corruption import SHAPES, SOURCES, CorruptionConfig, corrupt


def good_image(seed: int) -> np.ndarray:
    return texture(np.random.default_rng(seed), 96, 128).astype(np.uint8)


DONORS = [good_image(100 + i) for i in range(4)]


def test_the_mask_is_exactly_the_changed_pixels_and_forms_coherent_defects():
    seen = collections.Counter()
    for i in range(200):
        image = good_image(i)
        sample = corrupt(image, DONORS, np.random.default_rng((7, i)))
        np.testing.assert_array_equal(sample.target, to_float(image))  # no noise: the target is the image
        assert sample.corrupted.dtype == np.float32 and 0 <= sample.corrupted.min() and sample.corrupted.max() <= 1
        # outside the mask nothing changed; inside it every pixel did
        np.testing.assert_array_equal(sample.corrupted[~sample.mask], sample.target[~sample.mask])
        assert (sample.corrupted[sample.mask] != sample.target[sample.mask]).all()
        if sample.defects:
            count, _ = cv2.connectedComponents(sample.mask.astype(np.uint8), connectivity=8)
            assert 1 <= count - 1 <= 3 * len(sample.defects), (i, sample.defects)  # spatially coherent
            assert sample.mask.mean() < 0.35
        else:
            assert not sample.mask.any()
        seen.update(sample.defects)
    assert {shape for shape, _ in seen} == set(SHAPES) and {source for _, source in seen} == set(SOURCES)
    assert sum(1 for i in range(200) if corrupt(good_image(i), DONORS, np.random.default_rng((7, i))).defects) > 150


def test_seeded_and_deterministic():
    image = good_image(1)
    a = corrupt(image, DONORS, np.random.default_rng((3, 5)))
    b = corrupt(image, DONORS, np.random.default_rng((3, 5)))
    c = corrupt(image, DONORS, np.random.default_rng((3, 6)))
    np.testing.assert_array_equal(a.corrupted, b.corrupted)
    assert a.defects == b.defects
    assert not np.array_equal(a.corrupted, c.corrupted)


def test_noise_stays_in_the_target_and_out_of_the_mask():
    image = good_image(2)
    config = CorruptionConfig(noise_std=0.02, probability=1.0)
    sample = corrupt(image, DONORS, np.random.default_rng(0), config)
    assert np.abs(sample.target - image / 255.0).mean() > 0.01  # the target carries the noise
    np.testing.assert_array_equal(sample.corrupted[~sample.mask], sample.target[~sample.mask])
    assert 0 < sample.mask.mean() < 0.35


def test_colour_and_16_bit_images_and_donors_of_another_layout():
    colour = cv2.cvtColor(good_image(3), cv2.COLOR_GRAY2BGR)
    deep = good_image(4).astype(np.uint16) * 257
    for image in (colour, deep):
        sample = corrupt(image, DONORS, np.random.default_rng(1), CorruptionConfig(probability=1.0, sources=("other",)))
        assert sample.corrupted.shape == image.shape and sample.mask.shape == image.shape[:2]
        assert sample.mask.any()
        np.testing.assert_array_equal(sample.corrupted[~sample.mask], sample.target[~sample.mask])


def test_settings_are_checked():
    for bad in ({"min_size": 0.5, "max_size": 0.1}, {"probability": 2}, {"shapes": ("star",)}, {"sources": ()},
                {"noise_std": -1}):
        with pytest.raises(ConfigError):
            CorruptionConfig(**bad)


def test_self_supervised_training_restores_good_features_from_corrupted_ones(synthetic_dataset, tmp_path):
    import torch

    from stmae_edge.data import train_images
    from stmae_edge.models.stmae import STMAE, preset
    from stmae_edge.training.train import TrainConfig, corrupted_features, extract_features, fit, preprocessing_for, train

    config = preset("tiny")
    torch.manual_seed(0)
    model = STMAE(config, backbone_weights="random").eval()
    paths = train_images(synthetic_dataset)[:6]
    cfg = TrainConfig(epochs=1, batch_size=4, self_supervised=True, corruptions_per_image=3)
    clean = extract_features(model, preprocessing_for(config), paths)
    inputs, targets_of = corrupted_features(model, preprocessing_for(config), paths, cfg)
    again, _ = corrupted_features(model, preprocessing_for(config), paths, cfg)
    assert inputs.shape == (18, *clean.shape[1:]) and targets_of.tolist() == [i for i in range(6) for _ in range(3)]
    assert torch.equal(inputs, again)  # seeded
    moved = (inputs.float() - clean[targets_of].float()).abs().flatten(1).amax(dim=1) / clean.float().abs().max()
    assert (moved > 0.05).float().mean() > 0.5  # most corrupted versions differ clearly from their good image

    # Three models from one set of starting weights: with the good features as inputs, self-supervised
    # fitting is exactly plain fitting; with corrupted inputs (the targets still the good features) it
    # is a different optimisation, from the same start
    start = STMAE(config, backbone_weights="none").state_dict()

    def from_start() -> STMAE:
        model = STMAE(config, backbone_weights="none")
        model.load_state_dict(start)
        return model

    plain = fit(from_start(), clean, cfg)
    assert fit(from_start(), clean, cfg, clean, torch.arange(6)) == plain
    assert fit(from_start(), clean, cfg, inputs, targets_of) != plain

    metadata = train(synthetic_dataset, tmp_path / "ss.pt", config, TrainConfig(epochs=1, batch_size=8,
                     self_supervised=True), backbone_weights="random")
    assert metadata.training["self_supervised"] is True
