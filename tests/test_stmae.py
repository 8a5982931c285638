"""The ST-MAE model: the split, the transition, raster order, determinism, batch invariance."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stmae_edge.errors import ConfigError
from stmae_edge.models.gaussian import fit_position_gaussian
from stmae_edge.models.maps import gaussian_kernel, smooth
from stmae_edge.models.stmae import (
    STMAE,
    STMAEConfig,
    checkerboard_split,
    explicit_attention,
    fused_attention,
    preset,
    random_split,
    take_tokens,
    unit_tokens,
)
from stmae_edge.preprocessing import Preprocessing
from stmae_edge.training.train import (
    fit_gaussian,
    fit_intensity_target,
    fit_score_head,
    fit_score_head_cross_fitted,
    fit_score_scales,
)


@pytest.fixture(scope="module")
def model() -> STMAE:
    torch.manual_seed(0)
    return STMAE(preset("tiny"), backbone_weights="random").eval()


def _feats(model: STMAE, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = model.config.grid
    return torch.randn(batch, model.features.channels, g, g, generator=torch.Generator().manual_seed(seed))


def _assert_partition(a: torch.Tensor, b: torch.Tensor, n: int) -> None:
    assert a.shape == b.shape == (n // 2,)
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(n))


def _block_grid(split: torch.Tensor, side: int, unit: int) -> torch.Tensor:
    """Which set each unit x unit block is in, asserting that no block is cut: (side/unit, side/unit)."""
    in_set = torch.zeros(side * side, dtype=torch.bool)
    in_set[split] = True
    blocks = in_set.view(side // unit, unit, side // unit, unit).permute(0, 2, 1, 3).flatten(2)
    assert (blocks.all(dim=2) | ~blocks.any(dim=2)).all(), "a block was split between the halves"
    return blocks[..., 0]


@pytest.mark.parametrize("unit", [1, 2, 4])
def test_eval_split_is_a_complementary_checkerboard_of_blocks(unit):
    side = 8
    a, b = checkerboard_split(side, unit)
    _assert_partition(a, b, side * side)
    assert torch.equal(a, a.sort().values) and torch.equal(b, b.sort().values)
    # Checkerboard of blocks: the 4 neighbouring blocks of every block lie in the other set.
    grid = _block_grid(a, side, unit)
    assert (grid[:, 1:] != grid[:, :-1]).all() and (grid[1:, :] != grid[:-1, :]).all()


def test_the_model_uses_its_configured_blocks(model):
    c = model.config
    a, b = checkerboard_split(c.tokens_per_side, c.mask_unit)
    assert torch.equal(model.eval_split_a, a) and torch.equal(model.eval_split_b, b)
    assert model.mask_units.shape == ((c.tokens_per_side // c.mask_unit) ** 2, c.mask_unit ** 2)


@pytest.mark.parametrize("unit", [1, 2])
def test_random_split_is_fresh_per_sample_and_keeps_blocks_whole(unit):
    side = 8
    a, b = random_split(4, side * side, torch.Generator().manual_seed(0), units=unit_tokens(side, unit))
    for i in range(4):
        _assert_partition(a[i], b[i], side * side)
        _block_grid(a[i], side, unit)
    assert not torch.equal(a[0].sort().values, a[1].sort().values)
    with pytest.raises(ConfigError, match="blocks"):
        STMAEConfig(grid=16, patch=2, mask_unit=3)  # 8 tokens a side: no 3 x 3 blocks


def test_take_tokens_constant_and_per_sample_indices_agree():
    x = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([5, 1, 7])
    assert torch.equal(take_tokens(x, idx), take_tokens(x, idx.expand(2, -1)))
    assert torch.equal(take_tokens(x, idx)[1, 0], x[1, 5])


class OracleSTMAE(STMAE):
    """A transition that 'predicts' exactly its targets: a correct raster restore gives a zero map."""

    def transit(self, patches, split_a, split_b):
        return take_tokens(patches, split_a), take_tokens(patches, split_b)


def test_raster_order_is_restored_exactly():
    torch.manual_seed(0)
    oracle = OracleSTMAE(preset("tiny"), backbone_weights="random").eval()
    feats = _feats(oracle)
    # Fixed eval split and random per-sample training splits alike.
    assert torch.equal(oracle.reconstruct(feats), feats)
    n = oracle.config.tokens_per_side ** 2
    a, b = random_split(feats.shape[0], n, torch.Generator().manual_seed(3))
    assert torch.equal(oracle.reconstruct(feats, a, b), feats)
    assert oracle.transition_map(feats, oracle.reconstruct(feats)).abs().max() == 0
    # Without the inverse permutation the same predictions land in the wrong places.
    unrestored = oracle.fold(torch.cat(oracle.transit(oracle.tokenize(feats), a, b), dim=1))
    assert oracle.transition_map(feats, unrestored).abs().max() > 0.1


def test_a_token_is_a_patch_of_every_channel_in_raster_order(model):
    feats = _feats(model)
    b, ch, g, _ = feats.shape
    p, s = model.config.patch, model.config.tokens_per_side
    tokens = model.tokenize(feats)
    # Token (row, col) holds feats[:, :, row*p:(row+1)*p, col*p:(col+1)*p], flattened channel first.
    for row, col in ((0, 0), (0, s - 1), (s - 1, 1)):
        patch = feats[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p].reshape(b, ch * p * p)
        assert torch.equal(tokens[:, row * s + col], patch)
    assert torch.equal(model.fold(tokens), feats)


def test_fused_attention_is_the_attention_the_graph_exports():
    q, k, v = torch.randn(3, 2, 4, 50, 8, generator=torch.Generator().manual_seed(0))
    written_out = explicit_attention(q, k, v, 8 ** -0.5)
    assert torch.allclose(fused_attention(q, k, v, 8 ** -0.5), written_out, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(fused_attention(q, k, v, 1.0), written_out, atol=1e-3)


def test_each_half_is_predicted_only_from_the_other(model):
    feats = _feats(model, batch=1)
    side, p = model.config.tokens_per_side, model.config.patch
    recon = model.reconstruct(feats)
    # Change every patch of half A: predictions at A's positions (made from B alone) must not move.
    token_mask = torch.zeros(side * side)
    token_mask[model.eval_split_a] = 1
    pixel_mask = token_mask.view(side, side).repeat_interleave(p, 0).repeat_interleave(p, 1).bool()
    changed = feats.clone()
    changed[..., pixel_mask] += 5.0
    recon_changed = model.reconstruct(changed)
    assert torch.allclose(recon[..., pixel_mask], recon_changed[..., pixel_mask], atol=1e-5)
    assert (recon[..., ~pixel_mask] - recon_changed[..., ~pixel_mask]).abs().max() > 1e-3


def test_eval_is_deterministic_and_train_mode_is_not_used_for_scoring(model):
    images = torch.randn(2, 3, model.config.input_size, model.config.input_size, generator=torch.Generator().manual_seed(0))
    maps1, scores1 = model(images)
    torch.manual_seed(123)  # the eval path must not draw random numbers
    maps2, scores2 = model(images)
    assert torch.equal(maps1, maps2) and torch.equal(scores1, scores2)
    assert maps1.shape == (2, 1, model.config.input_size, model.config.input_size)
    # The tiny preset has a score head, as the default: the score is its own (image_score).
    _, score_features = model.extract_with_score(images)
    assert torch.equal(scores1, model.image_score(score_features))
    without_head = STMAE(replace(model.config, score_layers=()), backbone_weights="none")
    without_head.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("score_")},
                                 strict=False)
    maps, scores = without_head.eval()(images)
    assert torch.equal(maps, maps1)  # the head leaves the map alone
    assert torch.equal(scores, maps.flatten(1).amax(1))  # without one, the score is the max of the map users see


def test_score_head_reads_deep_layers_from_the_same_backbone_pass(model):
    images = torch.randn(2, 3, model.config.input_size, model.config.input_size,
                         generator=torch.Generator().manual_seed(7))
    features, score_features = model.extract_with_score(images)
    c = model.config
    assert torch.equal(features, model.extract(images))
    assert score_features.shape == (2, model.features.score_channels, c.score_grid, c.score_grid)
    assert model.features.score_channels == 40 + 112 + 192  # blocks 4, 10, 14 of efficientnet-lite0
    assert model.score_map(score_features).shape == (2, 1, c.score_grid, c.score_grid)
    with pytest.raises(ConfigError, match="score head"):
        replace(c, score_dim=0)
    with pytest.raises(ConfigError, match="unknown"):
        STMAE(replace(c, score_layers=("blocks.99",)), backbone_weights="none")


def test_cross_fitted_scores_come_from_heads_that_never_saw_the_image():
    """Every good image trains the final head; each one's score, for the threshold, comes from a head
    fitted without it (as many folds as images here: each image's head is fitted on all the others)."""
    torch.manual_seed(0)
    m = STMAE(preset("tiny"), backbone_weights="random").eval()
    s = m.config.score_grid
    goods = torch.randn(12, m.features.score_channels, s, s, generator=torch.Generator().manual_seed(1))
    scores = fit_score_head_cross_fitted(m, goods, folds=12, seed=0)
    final, without = (STMAE(preset("tiny"), backbone_weights="random").eval() for _ in range(2))
    fit_score_head(final, goods)
    torch.testing.assert_close(m.score_precision, final.score_precision)  # the final head: every image
    with torch.no_grad():
        for i in (0, 7):
            fit_score_head(without, goods[torch.arange(12) != i])
            without.score_scale_stats.copy_(m.score_scale_stats)
            torch.testing.assert_close(scores[i], without.image_score(goods[i:i + 1])[0])
        assert not torch.allclose(scores, m.image_score(goods))  # not the final head's own scores
    with pytest.raises(ConfigError, match="too few for 40 score folds"):
        fit_score_head_cross_fitted(m, goods, folds=40, seed=0)


def test_score_is_the_larger_of_two_smoothings_each_on_the_held_out_images_scale():
    assert preset("small").score_wide_sigma > preset("small").score_smoothing_sigma
    assert not preset("small-one-scale").score_wide_sigma
    torch.manual_seed(0)
    m = STMAE(preset("tiny"), backbone_weights="random").eval()
    c, s = m.config, m.config.score_grid
    field = lambda n, seed: torch.randn(n, m.features.score_channels, s, s,  # noqa: E731
                                        generator=torch.Generator().manual_seed(seed))
    fit_score_head(m, field(40, 1))
    holdout = field(12, 2)
    fit_score_scales(m, holdout)

    def maxima(x):
        distance = m.score_distance(x)
        return [smooth(distance, gaussian_kernel(sigma)).flatten(1).amax(1)
                for sigma in (c.score_smoothing_sigma, c.score_wide_sigma)]

    with torch.no_grad():
        narrow, wide = maxima(holdout)
        torch.testing.assert_close(m.score_scale_stats,
                                   torch.tensor([[narrow.mean(), narrow.std(correction=0)],
                                                 [wide.mean(), wide.std(correction=0)]]))
        test = field(3, 3)
        test[1, :, 1, 2] += 3.0  # one cell far out
        direction = torch.randn(m.features.score_channels, 1, 1, generator=torch.Generator().manual_seed(9))
        test[2, :, :3, :3] += 2.0 * direction  # a patch of cells, each less far out
        narrow, wide = maxima(test)
        st = m.score_scale_stats
        z_narrow, z_wide = (narrow - st[0, 0]) / st[0, 1], (wide - st[1, 0]) / st[1, 1]
        torch.testing.assert_close(m.image_score(test), torch.maximum(z_narrow, z_wide))
        assert z_narrow[1] > z_wide[1] and z_wide[2] > z_narrow[2]  # each smoothing decides one of them


def test_intensity_normalisation_makes_scores_blind_to_gain_and_offset():
    assert preset("small-intensity-norm").intensity_norm and not preset("small").intensity_norm
    torch.manual_seed(0)
    model = STMAE(preset("tiny", intensity_norm=True), backbone_weights="random").eval()
    s = model.config.input_size
    images = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(5)) * 0.5 - 0.7
    model.intensity.target.copy_(torch.tensor([-0.4, 0.2]))
    normalised = model.normalize_intensity(images)
    assert torch.allclose(normalised.mean(dim=(1, 2, 3)), torch.tensor(-0.4), atol=1e-5)
    assert torch.allclose(normalised.std(dim=(1, 2, 3), correction=0), torch.tensor(0.2), atol=1e-5)
    maps, scores = model(images)
    brighter_maps, brighter_scores = model(images * 1.7 + 0.3)  # more gain, a brighter lamp
    assert torch.allclose(brighter_scores, scores, rtol=1e-4, atol=1e-4)
    assert torch.allclose(brighter_maps, maps, rtol=1e-4, atol=1e-4)
    flat = model.normalize_intensity(torch.full((1, 3, s, s), 0.25))  # a blank frame stays blank
    assert torch.allclose(flat, torch.tensor(-0.4))
    raw = STMAE(replace(model.config, intensity_norm=False), backbone_weights="none")
    assert not hasattr(raw, "intensity") and torch.equal(raw.normalize_intensity(images), images)


def test_score_head_judges_each_channel_against_the_images_own_positions(model):
    c = model.config
    assert c.score_standardize and preset("small").score_standardize and not preset("small-head-raw").score_standardize
    score_features = 10 * torch.rand(2, model.features.score_channels, c.score_grid, c.score_grid,
                                     generator=torch.Generator().manual_seed(6))
    inputs = model.score_inputs(score_features)
    assert torch.allclose(inputs.mean(dim=(2, 3)), torch.tensor(0.0), atol=1e-5)
    assert torch.allclose(inputs.std(dim=(2, 3), correction=0), torch.tensor(1.0), atol=1e-2)
    # a channel raised or scaled on the whole image does not change the score; a channel that is 0 stays 0
    shifted = score_features * 3.0 + 2.0
    shifted[:, 0] = 0.0
    assert torch.all(model.score_inputs(shifted)[:, 0] == 0)
    assert torch.allclose(model.score_inputs(shifted)[:, 1:], inputs[:, 1:], atol=3e-3)  # up to the std floor
    raw = STMAE(replace(c, score_standardize=False), backbone_weights="none")
    assert torch.equal(raw.score_inputs(score_features), score_features)


def test_map_scales_each_residual_channel_by_its_spread_over_the_image(model):
    assert preset("small-map-scaled").gaussian_scale and not preset("small").gaussian_scale
    scaled = STMAE(replace(model.config, gaussian_scale=True), backbone_weights="none")
    feats = _feats(model, batch=2)
    with torch.no_grad():
        recon = model.reconstruct(feats)
        inputs = scaled.gaussian_input(feats, recon)
        assert torch.allclose(inputs.std(dim=(2, 3), correction=0), torch.tensor(1.0), atol=1e-2)
        # Not centred: the residual's sign and offset are kept, only its scale is the image's own.
        residual = feats - recon
        assert torch.allclose(inputs.mean(dim=(2, 3)) * residual.std(dim=(2, 3), correction=0),
                              residual.mean(dim=(2, 3)), atol=1e-2)
        # A tile whose residual is three times larger everywhere gets the same Gaussian input, so the same map.
        noisier = recon + 3.0 * residual
        torch.testing.assert_close(scaled.gaussian_input(noisier, recon), inputs, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(model.gaussian_input(feats, recon), residual)  # the default: unscaled
        # Why it is not the default: a defect over a quarter of the tile, however strong, raises the std
        # it is divided by, and stays near 1 / sqrt(f (1 - f)) = 2.3 units; unscaled it stands out by 100.
        g = model.config.grid
        defect = torch.zeros(1, model.features.channels, g, g)
        defect[..., : g // 2, : g // 2] = 100.0
        assert float(scaled.gaussian_input(defect, torch.zeros_like(defect)).max()) == pytest.approx(2.31, abs=0.01)
        assert float(model.gaussian_input(defect, torch.zeros_like(defect)).max()) == 100.0


def test_intensity_target_is_the_training_images_average_mean_and_std():
    model = STMAE(preset("tiny", intensity_norm=True), backbone_weights="none")
    rng = np.random.default_rng(0)
    images = [rng.integers(lo, lo + 60, (40, 30, 3), dtype=np.uint8) for lo in (10, 120)]
    pre = Preprocessing(input_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    fit_intensity_target(model, pre, images, batch_size=1)
    batch = torch.from_numpy(pre(images)).double()
    expected = [batch.mean(dim=(1, 2, 3)).mean(), batch.std(dim=(1, 2, 3), correction=0).mean()]
    assert torch.allclose(model.intensity.target, torch.tensor(expected, dtype=torch.float32))
    assert -1 < model.intensity.target[0] < 1 and 0 < model.intensity.target[1] < 0.2


def test_batch_size_does_not_change_per_image_results(model):
    images = torch.randn(5, 3, model.config.input_size, model.config.input_size,
                         generator=torch.Generator().manual_seed(4))
    maps_batch, scores_batch = model(images)
    for i in range(5):
        m, s = model(images[i:i + 1])
        assert torch.allclose(m, maps_batch[i:i + 1], rtol=1e-4, atol=1e-6)
        assert torch.allclose(s, scores_batch[i:i + 1], rtol=1e-4, atol=1e-6)


def test_training_reduces_loss_on_a_fixed_batch(model):
    torch.manual_seed(0)
    m = STMAE(preset("tiny"), backbone_weights="random")
    # Smooth fields: a patch is predictable from its neighbours, as in real feature maps.
    coarse = torch.randn(4, m.features.channels, 4, 4, generator=torch.Generator().manual_seed(2))
    feats = torch.nn.functional.interpolate(coarse, size=(m.config.grid,) * 2, mode="bilinear")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    n = m.config.tokens_per_side ** 2
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        a, b = random_split(4, n, gen)
        loss = m.loss(feats, m.reconstruct(feats, a, b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(not p.requires_grad for p in m.features.parameters())


def test_residual_is_normalised_per_position(model):
    feats = _feats(model, batch=2)
    recon = model.reconstruct(feats)
    raw = (feats - recon).pow(2).mean(1, keepdim=True) * (1 - torch.cosine_similarity(feats, recon, dim=1)[:, None])
    torch.testing.assert_close(model.residual(feats, recon), raw)
    g = model.config.grid
    seeded = torch.Generator().manual_seed(3)
    mean, std = torch.rand(1, 1, g, g, generator=seeded), torch.rand(1, 1, g, g, generator=seeded) + 0.5
    residual_alone = replace(model.config, gaussian_weight=0.0, wide_window=0, level_fraction=0.0)
    m = STMAE(residual_alone, backbone_weights="random").eval()
    m.load_state_dict({**{k: v for k, v in model.state_dict().items() if not k.startswith(("gaussian_", "fusion_", "wide_"))},
                       "residual_mean": mean, "residual_std": std})
    pad = m.smoothing_kernel.shape[-1] // 2
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad((raw - mean) / std, (pad,) * 4, mode="replicate"), m.smoothing_kernel)
    torch.testing.assert_close(m.anomaly_map(feats, recon), expected)


@pytest.mark.parametrize("gaussian_input, gaussian_scale", [("residual", False), ("features", False), ("residual", True)])
def test_fused_map_adds_the_per_position_gaussian_on_a_common_scale(gaussian_input, gaussian_scale):
    torch.manual_seed(0)
    assert preset("small").gaussian_weight > 0 and preset("tiny").gaussian_input == preset("small").gaussian_input
    config = replace(preset("tiny"), gaussian_input=gaussian_input, gaussian_scale=gaussian_scale,
                     transition_weight=0.5, wide_window=0, level_fraction=0.0)  # both terms; the wide Gaussian's and
    # the level's tests are below
    m = STMAE(config, backbone_weights="random").eval()
    c, g = m.features.channels, config.grid
    smooth_field = lambda n, seed: torch.nn.functional.interpolate(  # noqa: E731
        torch.randn(n, c, 4, 4, generator=torch.Generator().manual_seed(seed)), size=(g, g), mode="bilinear")
    good, holdout = smooth_field(40, 1), smooth_field(8, 2)
    fit_gaussian(m, good, holdout)
    with torch.no_grad():
        modelled = good - m.reconstruct(good) if gaussian_input == "residual" else good
        if gaussian_scale:
            modelled = modelled / (modelled.std(dim=(2, 3), keepdim=True, correction=0) + 1e-3)
        torch.testing.assert_close(m.gaussian_input(good, m.reconstruct(good)), modelled)
        # The projection holds orthonormal principal directions; the Gaussian is the baseline's definition.
        projection = m.gaussian_projection
        assert projection.shape == (c, config.gaussian_dim)
        torch.testing.assert_close(projection.T @ projection, torch.eye(config.gaussian_dim), atol=1e-4, rtol=0)
        mean, precision = fit_position_gaussian(torch.einsum("bchw,cd->bdhw", modelled, projection),
                                                config.gaussian_eps)
        torch.testing.assert_close(m.gaussian_mean, mean)
        torch.testing.assert_close(m.gaussian_precision, precision, rtol=1e-4, atol=1e-4)
        # Both maps have mean 0 and std 1 over the held-out images, so neither dominates by its units.
        recon = m.reconstruct(holdout)
        transition = m.transition_map(holdout, recon)
        gaussian = m.gaussian_map(m.gaussian_input(holdout, recon))
        expected = torch.tensor([[transition.mean(), transition.std(correction=0)],
                                 [gaussian.mean(), gaussian.std(correction=0)]])
        torch.testing.assert_close(m.fusion_stats, expected)
        test = smooth_field(2, 3)
        test[1, :, 5, 9] += 4.0
        recon = m.reconstruct(test)
        s = m.fusion_stats
        gaussian = m.gaussian_map(m.gaussian_input(test, recon))
        fused = (0.5 * (m.transition_map(test, recon) - s[0, 0]) / s[0, 1]
                 + config.gaussian_weight * (gaussian - s[1, 0]) / s[1, 1])
        torch.testing.assert_close(m.anomaly_map(test, recon), smooth(fused, m.smoothing_kernel))
        assert divmod(int(gaussian[1, 0].argmax()), g) == (5, 9)


def test_wide_gaussian_averages_neighbouring_cells_and_the_map_takes_the_larger_z_score():
    torch.manual_seed(0)
    config = replace(preset("tiny"), wide_window=5, wide_dim=6, level_fraction=0.0)
    m = STMAE(config, backbone_weights="random").eval()
    c, g = m.features.channels, config.grid
    good = torch.randn(40, c, g, g, generator=torch.Generator().manual_seed(1))
    holdout = torch.randn(8, c, g, g, generator=torch.Generator().manual_seed(2))
    fit_gaussian(m, good, holdout)
    with torch.no_grad():
        modelled = m.gaussian_input(good, m.reconstruct(good))
        # Each cell the mean of the 5 x 5 cells around it; at a corner, of the 3 x 3 there.
        averaged = m.wide_input(modelled)
        torch.testing.assert_close(averaged[:, :, 7, 9], modelled[:, :, 5:10, 7:12].mean(dim=(2, 3)))
        torch.testing.assert_close(averaged[:, :, 0, 0], modelled[:, :, :3, :3].mean(dim=(2, 3)))
        projection = m.wide_projection
        assert projection.shape == (c, 6)
        torch.testing.assert_close(projection.T @ projection, torch.eye(6), atol=1e-4, rtol=0)
        mean, precision = fit_position_gaussian(torch.einsum("bchw,cd->bdhw", averaged, projection),
                                                config.gaussian_eps)
        torch.testing.assert_close(m.wide_mean, mean)
        torch.testing.assert_close(m.wide_precision, precision, rtol=1e-4, atol=1e-4)
        held = m.wide_map(m.gaussian_input(holdout, m.reconstruct(holdout)))
        torch.testing.assert_close(m.wide_stats, torch.tensor([[held.mean(), held.std(correction=0)]]))
        # A small shift spread evenly over a 6 x 6 region: faint in each cell, plain in their mean.
        test = torch.randn(2, c, g, g, generator=torch.Generator().manual_seed(3))
        direction = torch.randn(c, generator=torch.Generator().manual_seed(4))
        test[1, :, 4:10, 4:10] += 0.6 * (direction / direction.norm() * c ** 0.5)[:, None, None]
        recon = m.reconstruct(test)
        x = m.gaussian_input(test, recon)
        s, w = m.fusion_stats, m.wide_stats
        sharp = (m.gaussian_map(x) - s[1, 0]) / s[1, 1]
        wide = (m.wide_map(x) - w[0, 0]) / w[0, 1]
        torch.testing.assert_close(m.anomaly_map(test, recon),
                                   smooth(config.gaussian_weight * torch.maximum(sharp, wide), m.smoothing_kernel))
        def gain(z):  # inside the region, shifted image against the plain one
            return float((z[1, 0, 5:9, 5:9] - z[0, 0, 5:9, 5:9]).mean())
        assert gain(wide) > 2 * gain(sharp)
    with pytest.raises(ConfigError):
        replace(preset("tiny"), wide_window=4)
    with pytest.raises(ConfigError):
        replace(preset("transition-only"), wide_window=5)


def test_map_is_lowered_by_a_fraction_of_its_own_mean_so_a_tile_wide_departure_keeps_the_rest():
    torch.manual_seed(0)
    config = preset("tiny")
    assert config.level_fraction == preset("small").level_fraction == 0.5
    m = STMAE(config, backbone_weights="random").eval()
    c, g = m.features.channels, config.grid
    good = torch.randn(40, c, g, g, generator=torch.Generator().manual_seed(1))
    fit_gaussian(m, good, torch.randn(8, c, g, g, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        test = torch.randn(3, c, g, g, generator=torch.Generator().manual_seed(3))
        recon = m.reconstruct(test)
        z = m.gaussian_z(m.gaussian_input(test, recon))
        lowered = z - 0.5 * z.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(m.anomaly_map(test, recon), smooth(lowered, m.smoothing_kernel))
        # Within an image the map keeps its contrasts; across images a tile that departs everywhere by
        # d (its mean up by d) stands 0.5 d higher, not d: half of a tile-wide departure remains.
        unlevelled = STMAE(replace(config, level_fraction=0.0), backbone_weights="random").eval()
        unlevelled.load_state_dict(m.state_dict())
        plain = unlevelled.anomaly_map(test, recon)
        levelled = m.anomaly_map(test, recon)
        torch.testing.assert_close(levelled - levelled[:, :, :1, :1], plain - plain[:, :, :1, :1], atol=1e-4, rtol=0)
        shift = (plain - levelled).flatten(1).mean(dim=1)
        torch.testing.assert_close(shift, 0.5 * z.flatten(1).mean(dim=1), atol=1e-4, rtol=0)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError):
            replace(config, level_fraction=bad)
    with pytest.raises(ConfigError):  # it lowers the Gaussian's map
        replace(preset("transition-only"), level_fraction=0.5)


def test_presets_and_config_validation():
    assert preset("paper").backbone == "vgg19" and preset("paper").embed_dim == 768
    assert STMAEConfig.from_dict(preset("small").to_dict()) == preset("small")
    with pytest.raises(ConfigError):
        preset("huge")
    with pytest.raises(ConfigError):
        STMAEConfig(grid=64, patch=5)
    with pytest.raises(ConfigError):
        STMAEConfig.from_dict({**preset("small").to_dict(), "unknown_key": 1})


def test_paper_preset_builds_and_runs():
    torch.manual_seed(0)
    m = STMAE(preset("paper"), backbone_weights="random").eval()
    assert m.features.channels == 64 + 128 + 256 + 512
    assert m.config.tokens_per_side == 16 and m.token_dim == 960 * 16
    with torch.no_grad():
        maps, scores = m(torch.randn(1, 3, 256, 256))
    assert maps.shape == (1, 1, 256, 256) and torch.isfinite(scores).all()


def test_the_gaussians_are_fitted_a_chunk_at_a_time_exactly_as_in_one_piece(monkeypatch):
    """fit_gaussian never holds every training image's inputs (720 KB each on the default preset): it
    samples the principal directions' vectors and adds the Gaussians' sums a chunk at a time. The result
    is the one-piece fit's, bit for bit, across several chunks and with the vectors sampled."""
    import stmae_edge.training.train as training
    from stmae_edge.models.gaussian import GAUSSIAN_CHUNK

    monkeypatch.setattr(training, "PCA_SAMPLES", 3000)  # fewer than the vectors here: the sampled branch
    config = replace(preset("tiny"), wide_window=5, wide_dim=6, gaussian_dim=8, level_fraction=0.0)
    m = STMAE(config, backbone_weights="random").eval()
    c, g = m.features.channels, config.grid
    good = torch.randn(2 * GAUSSIAN_CHUNK + 9, c, g, g, generator=torch.Generator().manual_seed(1)).half()
    holdout = torch.randn(8, c, g, g, generator=torch.Generator().manual_seed(2)).half()
    fit_gaussian(m, good, holdout)
    with torch.no_grad():
        f = torch.cat([m.standardize(chunk.float()) for chunk in good.split(32)])
        inputs = torch.cat([m.gaussian_input(x, m.reconstruct(x)) for x in f.split(32)])
        assert len(inputs) * g * g > 3000

        def directions(features, count):  # the definition: a seeded sample of the vectors, in one piece
            vectors = features.permute(0, 2, 3, 1).reshape(-1, c)
            vectors = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[:3000]].double()
            return torch.linalg.svd(vectors - vectors.mean(dim=0), full_matrices=False)[2][:count].T.float()

        sharp, wide = directions(inputs, 8), directions(m.wide_input(inputs), 6)
        assert torch.equal(m.gaussian_projection, sharp) and torch.equal(m.wide_projection, wide)
        for (mean, precision), (want_mean, want_precision) in (
                (fit_position_gaussian(torch.einsum("bchw,cd->bdhw", inputs, sharp), config.gaussian_eps),
                 (m.gaussian_mean, m.gaussian_precision)),
                (fit_position_gaussian(torch.einsum("bchw,cd->bdhw", m.wide_input(inputs), wide), config.gaussian_eps),
                 (m.wide_mean, m.wide_precision))):
            assert torch.equal(mean, want_mean) and torch.equal(precision, want_precision)


def test_the_score_head_is_fitted_on_chosen_rows_exactly_as_on_their_copy(model, monkeypatch):
    """Cross-fitting fits the head on all but one fold: by index, chunk by chunk, not on a copy."""
    import stmae_edge.training.train as training

    monkeypatch.setattr(training, "PCA_SAMPLES", 500)
    c = model.config
    features = 10 * torch.rand(150, model.features.score_channels, c.score_grid, c.score_grid,
                               generator=torch.Generator().manual_seed(7))
    rows = torch.nonzero(torch.arange(150) % 5 != 2).flatten()
    fitted = {}
    for name, args in (("by index", (features, rows)), ("copied", (features[rows],))):
        training.fit_score_head(model, *args)
        fitted[name] = [model.score_projection.clone(), model.score_mean.clone(), model.score_precision.clone()]
    assert all(torch.equal(a, b) for a, b in zip(fitted["by index"], fitted["copied"], strict=True))
    assert len(rows) * c.score_grid ** 2 > 500  # the principal directions from a sample of the vectors
