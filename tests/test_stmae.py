"""The ST-MAE model: the split, the transition, raster order, determinism, batch invariance."""

from __future__ import annotations

import pytest
import torch

from stmae_edge.errors import ConfigError
from stmae_edge.models.stmae import STMAE, STMAEConfig, checkerboard_split, preset, random_split, take_tokens


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


def test_eval_split_is_a_disjoint_complementary_checkerboard(model):
    side = model.config.tokens_per_side
    a, b = model.eval_split_a, model.eval_split_b
    _assert_partition(a, b, side * side)
    # Checkerboard: horizontal and vertical neighbours of every token lie in the other set.
    in_a = torch.zeros(side * side, dtype=torch.bool)
    in_a[a] = True
    grid = in_a.view(side, side)
    assert (grid[:, 1:] != grid[:, :-1]).all() and (grid[1:, :] != grid[:-1, :]).all()


def test_random_split_is_fresh_per_sample_and_partitions(model):
    n = model.config.tokens_per_side ** 2
    a, b = random_split(4, n, torch.Generator().manual_seed(0))
    for i in range(4):
        _assert_partition(a[i], b[i], n)
    assert not torch.equal(a[0].sort().values, a[1].sort().values)


def test_take_tokens_constant_and_per_sample_indices_agree():
    x = torch.randn(2, 8, 3)
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
    assert oracle.anomaly_map(feats, oracle.reconstruct(feats)).abs().max() == 0
    # Without the inverse permutation the same predictions land in the wrong places.
    unrestored = oracle.fold(torch.cat(oracle.transit(oracle.tokenize(feats), a, b), dim=1))
    assert oracle.anomaly_map(feats, unrestored).abs().max() > 0.1


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
    images = torch.randn(2, 3, model.config.input_size, model.config.input_size)
    maps1, scores1 = model(images)
    torch.manual_seed(123)  # the eval path must not draw random numbers
    maps2, scores2 = model(images)
    assert torch.equal(maps1, maps2) and torch.equal(scores1, scores2)
    assert maps1.shape == (2, 1, model.config.input_size, model.config.input_size)
    assert torch.equal(scores1, maps1.flatten(1).amax(1))  # the score is the max of the map users see


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
    mean, std = torch.rand(1, 1, g, g), torch.rand(1, 1, g, g) + 0.5
    m = STMAE(model.config, backbone_weights="random").eval()
    m.load_state_dict({**model.state_dict(), "residual_mean": mean, "residual_std": std})
    pad = m.smoothing_kernel.shape[-1] // 2
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad((raw - mean) / std, (pad,) * 4, mode="replicate"), m.smoothing_kernel)
    torch.testing.assert_close(m.anomaly_map(feats, recon), expected)


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
