"""ST-MAE: Siamese Transition Masked Autoencoder (Yao, Wang, Yu 2022) on frozen CNN features.

Data flow for one image (the names below are the methods):
  normalize_intensity  (presets with intensity_norm: small-intensity-norm) the image's pixels shifted
            and scaled to the good training images' mean and std: a brighter lamp or a darker part
            changes no feature (models/intensity.py)
  features  (C, G, G)   frozen backbone, layers resized to one grid, standardised per channel
  tokenize  (N, D)      p x p feature patches -> linear -> + positional embedding   (N = (G/p)^2)
  split     A, B        two disjoint, complementary halves of the N token positions, made of whole
                        u x u blocks of tokens (mask_unit), so a masked token's neighbours are masked too
  encode    lat_A, lat_B  one shared (Siamese) encoder runs on each half on its own
  transit   decoder input = one half's latents at its own positions + mask tokens at the other's;
            a light decoder predicts the other half. A predicts B, B predicts A.
  restore   predictions put back in raster order, folded into (C, G, G)
  transition_map  per-position residual (mean squared error, by default times 1 - cosine), as a
            z-score against the good training images at that position
  gaussian_map    (presets with gaussian_weight > 0, the default among them) Mahalanobis distance
            of each position's residual vector (features - prediction; or the features themselves,
            gaussian_input) to a Gaussian of the good images' at that position (models/gaussian.py);
            with gaussian_scale (preset small-map-scaled) each channel first divided by its spread
            over the image's own positions, so the map shows where a tile departs from itself;
            with wide_window (the default) a second Gaussian of the same input averaged over
            the k x k cells around each position (models/maps.py: two 1-D AveragePools in the
            graph), and the larger of the two z-scores
  defect_z  (models trained with --defects: defect_hidden) a classifier of each cell learnt from
            labelled defects, on the features, the residual and its neighbourhood means and both
            Gaussians' z-scores (defect_inputs; two 1 x 1 convolutions), as a z-score on held-out good
            images (training/defect_head.py), where positive (defect_rectified, as --defects trains it)
  anomaly   transition_map alone, or the two maps as z-scores on held-out good images, weighted by
            transition_weight and gaussian_weight and added (and defect_z, where there is one); with
            level_fraction (the default) lowered
            by that fraction of its own mean over the image; Gaussian-smoothed, upsampled
  score     image score = max of the map; or, with a score head (score_layers, the default), from the
            same backbone pass: deeper layers on a coarser grid (score_grid), each channel standardised
            over the image's positions (score_standardize, the default), projected on their principal
            components, Mahalanobis distance to a Gaussian per position, smoothed, maximum; with
            score_wide_sigma (the default) smoothed twice, narrow and wide, the larger of the two maxima
            as z-scores on held-out good images (issue 15: new tiles gain, BENCHMARKS.md).
            The map then shows where; the score says whether. Deep features see a whole tile's texture,
            which decides the image (BENCHMARKS.md, issue 15), while the shallow map keeps
            the localisation; a fused map traded one for the other.

Why a Gaussian of the residual: the scalar residual treats every channel and every position alike,
and on good parts it is noisy. The residual vector, measured against what is usual at its own
position, keeps what context does not explain and what the position does not usually show.
docs/BENCHMARKS.md has the ablation.

Training draws a fresh random split of blocks per sample per step; eval uses fixed complementary index
sets (a checkerboard of blocks over the token grid) kept as buffers, so export sees constant-index
Gathers and the inverse permutation as another Gather: no ScatterND, nothing random.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .backbones import FeatureExtractor
from .gaussian import projected_mahalanobis
from .intensity import IntensityNormalization
from .maps import ScoringScope, gaussian_kernel, maps_and_scores, mean_and_spread, neighbourhood_mean, smooth

# The architecture's settings and its named presets live beside it, as data (stmae_config.py)
from .stmae_config import (  # noqa: F401  (re-exported: the model's one definition of its config)
    DEEP_SCORE_LAYERS,
    GAUSSIAN_INPUTS,
    PRESETS,
    RESIDUALS,
    SCORE_LAYERS,
    STMAEConfig,
    preset,
)

# The labelled-defect head's inputs (defect_inputs): five sets of C channels, and the residual's mean
# over this many cells around each (its wide mean is over wide_window's). Measured on magnetic_tile's
# unseen tiles (docs/BENCHMARKS.md, issue 15).
DEFECT_INPUT_SETS = 5
DEFECT_NEAR_WINDOW = 5

# Added to a channel's std over an image's positions before dividing by it (score head, Gaussian input):
# a channel that is 0 everywhere on an image (ReLU6 layers can be) stays 0 instead of dividing by zero.
# Deep features' and residuals' stds are around 0.1 to 1.
STD_FLOOR = 1e-3


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v, written out: what the exported graph computes."""
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1) @ v


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention through PyTorch's fused kernel (equal to explicit_attention within float
    rounding): a training step on 2 CPU cores ~10% faster (docs/BENCHMARKS.md, issue 15)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Exported written out, so the ONNX graph has plain MatMul/Softmax that TensorRT fuses itself
        # (the exporter's own decomposition of the fused kernel adds Slice/Concat/Shape nodes).
        attend = explicit_attention if torch.compiler.is_exporting() else fused_attention
        out = attend(qkv[0], qkv[1], qkv[2], self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block, as in ViT/MAE."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def unit_tokens(side: int, unit: int = 1) -> torch.Tensor:
    """Token indices of each unit x unit block of a side x side token grid: (units, unit * unit), blocks
    and the tokens inside each in raster order. Masking whole blocks keeps a masked token's neighbours
    masked too, so their receptive fields cannot hand it its own content (notes: model.md)."""
    if side % unit:
        raise ConfigError(f"a {side} x {side} token grid cannot be cut into {unit} x {unit} blocks")
    # On the CPU even inside a meta-device build (checkpoint.check_architecture): indices are data.
    rows, cols = torch.meshgrid(torch.arange(side, device="cpu"), torch.arange(side, device="cpu"), indexing="ij")
    block = ((rows // unit) * (side // unit) + cols // unit).flatten()
    return torch.argsort(block, stable=True).view(-1, unit * unit)


def checkerboard_split(side: int, unit: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Complementary index sets over a side x side token grid, a checkerboard of unit x unit blocks:
    every block's 4 neighbouring blocks are in the other set. Each set is in raster order."""
    units = unit_tokens(side, unit)
    per_side = side // unit
    rows, cols = torch.meshgrid(torch.arange(per_side, device="cpu"), torch.arange(per_side, device="cpu"),
                                indexing="ij")
    white = ((rows + cols) % 2 == 0).flatten()
    return units[white].flatten().sort().values, units[~white].flatten().sort().values


def random_split(batch: int, tokens: int, generator: torch.Generator | None = None,
                 device: torch.device | None = None,
                 units: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh random half/half split per sample: (B, N/2) index tensors. With `units` (unit_tokens),
    whole blocks go to one half or the other."""
    if units is None:
        perm = torch.rand(batch, tokens, generator=generator, device=device).argsort(dim=1)
        return perm[:, : tokens // 2], perm[:, tokens // 2:]
    count = units.shape[0]
    perm = torch.rand(batch, count, generator=generator, device=device).argsort(dim=1)
    chosen = units.to(perm.device)[perm].flatten(1)  # (B, N): the tokens of the blocks in drawn order
    return chosen[:, : tokens // 2], chosen[:, tokens // 2:]


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for (B, K) indices, or x[:, index] for one constant (K,) index set (an ONNX Gather)."""
    if index.dim() == 1:
        return x.index_select(1, index)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class STMAE(nn.Module):
    def __init__(self, config: STMAEConfig, backbone_weights: str = "imagenet"):
        super().__init__()
        self.config = c = config
        self.features = FeatureExtractor(c.backbone, c.layers, c.grid, weights=backbone_weights,
                                         score_layers=c.score_layers, score_grid=c.score_grid)
        channels = self.features.channels
        self.token_dim = channels * c.patch * c.patch
        n = c.tokens_per_side ** 2

        # Standardising each channel over the training set puts shallow and deep layers on one scale.
        self.register_buffer("feature_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, channels, 1, 1))

        self.embed = nn.Linear(self.token_dim, c.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, c.embed_dim))
        self.encoder = nn.ModuleList(Block(c.embed_dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.embed_dim)

        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, c.decoder_dim))
        self.decoder = nn.ModuleList(Block(c.decoder_dim, c.decoder_heads, c.mlp_ratio)
                                     for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_dim)
        self.head = nn.Linear(c.decoder_dim, self.token_dim)

        split_a, split_b = checkerboard_split(c.tokens_per_side, c.mask_unit)
        self.register_buffer("mask_units", unit_tokens(c.tokens_per_side, c.mask_unit), persistent=False)
        self.register_buffer("eval_split_a", split_a)
        self.register_buffer("eval_split_b", split_b)
        self.register_buffer("eval_restore", torch.cat([split_a, split_b]).argsort())
        self.register_buffer("smoothing_kernel", gaussian_kernel(c.smoothing_sigma))
        self.scoring = ScoringScope()
        # Some positions (tile edges, borders) have large residuals on every good part; measuring each
        # position against its own good-image statistics keeps them from setting the image score.
        self.register_buffer("residual_mean", torch.zeros(1, 1, c.grid, c.grid))
        self.register_buffer("residual_std", torch.ones(1, 1, c.grid, c.grid))
        if c.gaussian_weight > 0:
            dim = c.gaussian_dim or channels
            positions = c.grid * c.grid
            self.register_buffer("gaussian_projection", torch.eye(channels, dim))
            self.register_buffer("gaussian_mean", torch.zeros(positions, dim))
            self.register_buffer("gaussian_precision", torch.eye(dim).repeat(positions, 1, 1))
            # (mean, std) of each map over held-out good images, rows: transition, gaussian. Each map
            # enters the fusion as a z-score on that common scale.
            self.register_buffer("fusion_stats", torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
            if c.wide_window:
                wide_dim = min(c.wide_dim, channels)
                self.register_buffer("wide_projection", torch.eye(channels, wide_dim))
                self.register_buffer("wide_mean", torch.zeros(positions, wide_dim))
                self.register_buffer("wide_precision", torch.eye(wide_dim).repeat(positions, 1, 1))
                # (mean, std) of the wide Gaussian's map over held-out good images, as fusion_stats' rows.
                self.register_buffer("wide_stats", torch.tensor([[0.0, 1.0]]))
        if c.score_layers:
            score_channels, positions = self.features.score_channels, c.score_grid * c.score_grid
            dim = min(c.score_dim, score_channels)
            self.register_buffer("score_projection", torch.eye(score_channels, dim))
            self.register_buffer("score_mean", torch.zeros(positions, dim))
            self.register_buffer("score_precision", torch.eye(dim).repeat(positions, 1, 1))
            self.register_buffer("score_smoothing_kernel", gaussian_kernel(c.score_smoothing_sigma))
            if c.score_wide_sigma > 0:
                self.register_buffer("score_wide_kernel", gaussian_kernel(c.score_wide_sigma))
                # (mean, std) over held-out good images of each smoothing's maximum; rows: narrow, wide.
                self.register_buffer("score_scale_stats", torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        if c.defect_hidden:
            inputs = DEFECT_INPUT_SETS * channels + 2  # and the two Gaussians' z-scores
            self.register_buffer("defect_hidden_weight", torch.zeros(c.defect_hidden, inputs, 1, 1))
            self.register_buffer("defect_hidden_bias", torch.zeros(c.defect_hidden))
            self.register_buffer("defect_output_weight", torch.zeros(1, c.defect_hidden, 1, 1))
            self.register_buffer("defect_output_bias", torch.zeros(1))
            # (mean, std) of the head's output over held-out good images' cells: its z-score's scale.
            self.register_buffer("defect_stats", torch.tensor([[0.0, 1.0]]))
        if c.intensity_norm:
            self.intensity = IntensityNormalization()  # the attribute name is INTENSITY_SCOPE
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # --- the stages -------------------------------------------------------------------------
    def normalize_intensity(self, images: torch.Tensor) -> torch.Tensor:
        """Each image brought to the training images' mean and std (models/intensity.py); unchanged
        without intensity_norm."""
        return self.intensity(images) if self.config.intensity_norm else images

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Raw backbone features (B, C, G, G); cacheable, since the backbone is frozen."""
        return self.features(self.normalize_intensity(images))

    def extract_with_score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw features and, with a score head, its raw features (B, C_s, S, S), from one backbone pass."""
        images = self.normalize_intensity(images)
        if not self.config.score_layers:
            return self.features(images), None
        return self.features.forward_with_score(images)

    def standardize(self, raw_features: torch.Tensor) -> torch.Tensor:
        return (raw_features - self.feature_mean) / self.feature_std

    # A token is a p x p patch of every channel, (C, p, p) flattened, tokens in raster order. Pixel
    # (un)shuffle moves the data as a six-axis permute would, ~10x faster with its gradient on a CPU
    # (docs/BENCHMARKS.md); exported as Reshape/Transpose and DepthToSpace.
    def tokenize(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, (G/p)^2, C*p*p)."""
        return F.pixel_unshuffle(feats, self.config.patch).flatten(2).transpose(1, 2)

    def fold(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, (G/p)^2, C*p*p) -> (B, C, G, G), the inverse of tokenize."""
        s = self.config.tokens_per_side
        return F.pixel_shuffle(tokens.transpose(1, 2).reshape(tokens.shape[0], self.token_dim, s, s),
                               self.config.patch)

    def reconstruct(self, feats: torch.Tensor, split_a: torch.Tensor | None = None,
                    split_b: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised features (B, C, G, G) -> each half predicted from the other, in raster order."""
        if split_a is None:
            split_a, split_b, restore = self.eval_split_a, self.eval_split_b, self.eval_restore
        else:
            restore = torch.cat([split_a, split_b], dim=-1).argsort(dim=-1)
        predicted_a, predicted_b = self.transit(self.tokenize(feats), split_a, split_b)
        # Predictions are in order (split_a, split_b); the inverse permutation restores raster order.
        return self.fold(take_tokens(torch.cat([predicted_a, predicted_b], dim=1), restore))

    def transit(self, patches: torch.Tensor, split_a: torch.Tensor,
                split_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (B, N, C*p*p) -> (prediction of half A from B, prediction of half B from A)."""
        b = patches.shape[0]
        tokens = self.embed(patches) + self.pos_embed

        # Siamese encoder: both halves through the same weights, stacked on the batch axis.
        latents = torch.cat([take_tokens(tokens, split_a), take_tokens(tokens, split_b)], dim=0)
        for block in self.encoder:
            latents = block(latents)
        latents = self.decoder_embed(self.encoder_norm(latents))
        latent_a, latent_b = latents[:b], latents[b:]

        # Transition: visible half at its own positions, mask tokens where the other half was.
        pos = self.decoder_pos_embed.expand(b, -1, -1)
        pos_a, pos_b = take_tokens(pos, split_a), take_tokens(pos, split_b)
        half = latent_a.shape[1]
        a_to_b = torch.cat([latent_a + pos_a, self.mask_token.expand(b, half, -1) + pos_b], dim=1)
        b_to_a = torch.cat([latent_b + pos_b, self.mask_token.expand(b, half, -1) + pos_a], dim=1)
        x = torch.cat([a_to_b, b_to_a], dim=0)
        for block in self.decoder:
            x = block(x)
        predicted = self.head(self.decoder_norm(x[:, half:]))  # only the masked half is a prediction
        return predicted[b:], predicted[:b]

    def residual(self, feats: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-position residual before normalisation: (B, 1, G, G)."""
        residual = (feats - recon).pow(2).mean(dim=1, keepdim=True)
        if self.config.residual == "mse_cos":
            residual = residual * (1.0 - F.cosine_similarity(feats, recon, dim=1).unsqueeze(1))
        return residual

    def transition_map(self, feats: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Residual, normalised per position if configured: (B, 1, G, G), float32."""
        residual = self.residual(feats.float(), recon.float())
        if self.config.position_norm:
            residual = (residual - self.residual_mean.float()) / self.residual_std.float()
        return residual

    def gaussian_input(self, feats: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """What the per-position Gaussian models: the features, or what the prediction left of them; with
        gaussian_scale each channel divided by its std over the image's positions (training fits the
        Gaussian on the same)."""
        x = feats - recon if self.config.gaussian_input == "residual" else feats
        if not self.config.gaussian_scale:
            return x
        _, spread = mean_and_spread(x, (2, 3))  # each channel over the image's positions
        return x / (spread + STD_FLOOR)

    def gaussian_map(self, inputs: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each position's (projected) inputs to that position's Gaussian."""
        return projected_mahalanobis(inputs, self.gaussian_projection, self.gaussian_mean, self.gaussian_precision)

    def wide_input(self, inputs: torch.Tensor) -> torch.Tensor:
        """The wide Gaussian's input: the Gaussian's inputs averaged over wide_window x wide_window cells."""
        return neighbourhood_mean(inputs, self.config.wide_window)

    def wide_map(self, inputs: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each position's averaged, projected inputs to that position's wide
        Gaussian: (B, 1, G, G). `inputs` as for gaussian_map."""
        return projected_mahalanobis(self.wide_input(inputs), self.wide_projection, self.wide_mean,
                                     self.wide_precision)

    def gaussian_z(self, inputs: torch.Tensor) -> torch.Tensor:
        """The Gaussian's map as a z-score on held-out good images; with wide_window, the larger of the
        sharp and the wide Gaussian's z-scores."""
        sharp, wide = self.gaussian_zs(inputs)
        return sharp if wide is None else torch.maximum(sharp, wide)

    def gaussian_zs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sharp Gaussian's z-score map and, with wide_window, the wide one's (else None)."""
        stats = self.fusion_stats.float()
        sharp = (self.gaussian_map(inputs) - stats[1, 0]) / stats[1, 1]
        if not self.config.wide_window:
            return sharp, None
        wide = self.wide_stats.float()
        return sharp, (self.wide_map(inputs) - wide[0, 0]) / wide[0, 1]

    def defect_inputs(self, feats: torch.Tensor, recon: torch.Tensor, sharp_z: torch.Tensor,
                      wide_z: torch.Tensor) -> torch.Tensor:
        """What the labelled-defect head reads at each cell (B, DEFECT_INPUT_SETS * C + 2, G, G), float32:
        the standardised features, the residual, the residual averaged over DEFECT_NEAR_WINDOW and over
        wide_window cells, the features less their mean over the image, and both Gaussians' z-scores."""
        feats, recon = feats.float(), recon.float()
        residual = feats - recon
        return torch.cat([feats, residual, neighbourhood_mean(residual, DEFECT_NEAR_WINDOW),
                          neighbourhood_mean(residual, self.config.wide_window),
                          feats - feats.mean(dim=(2, 3), keepdim=True), sharp_z, wide_z], dim=1)

    def defect_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The labelled-defect head on defect_inputs: (B, 1, G, G), a logit per cell (two 1 x 1
        convolutions; the inputs' standardisation is folded into the first)."""
        hidden = F.relu(F.conv2d(inputs, self.defect_hidden_weight.float(), self.defect_hidden_bias.float()))
        return F.conv2d(hidden, self.defect_output_weight.float(), self.defect_output_bias.float())

    def defect_z(self, inputs: torch.Tensor) -> torch.Tensor:
        """The head's logits as a z-score on held-out good images (defect_stats)."""
        stats = self.defect_stats.float()
        return (self.defect_logits(inputs) - stats[0, 0]) / stats[0, 1]

    def score_inputs(self, score_features: torch.Tensor) -> torch.Tensor:
        """What the score head's Gaussian models, float32: the raw deep features, or with score_standardize
        each channel standardised over the image's own positions (training fits the head on the same)."""
        x = score_features.float()
        if not self.config.score_standardize:
            return x
        mean, spread = mean_and_spread(x, (2, 3))  # each channel over the image's positions
        return (x - mean) / (spread + STD_FLOOR)

    def score_map(self, score_features: torch.Tensor) -> torch.Tensor:
        """The score head's map: distance of each position's projected deep features to that position's
        Gaussian, smoothed: (B, 1, S, S), float32. Its maximum is the image score, or with
        score_wide_sigma one of the two that image_score weighs. Runs under the scoring scope, so the
        INT8 graph keeps it in fp32 like the anomaly map."""
        return self.scoring(self._score_map, score_features)

    def _score_map(self, score_features: torch.Tensor) -> torch.Tensor:
        return smooth(self.score_distance(score_features), self.score_smoothing_kernel.float())

    def score_distance(self, score_features: torch.Tensor) -> torch.Tensor:
        """The score head's distance map before smoothing: (B, 1, S, S), float32."""
        return projected_mahalanobis(self.score_inputs(score_features), self.score_projection,
                                     self.score_mean, self.score_precision)

    def scale_maxima(self, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the maxima of the distance map smoothed narrow and wide (score_wide_sigma)."""
        narrow = smooth(distance, self.score_smoothing_kernel.float()).flatten(1).amax(dim=1)
        return narrow, smooth(distance, self.score_wide_kernel.float()).flatten(1).amax(dim=1)

    def image_score(self, score_features: torch.Tensor) -> torch.Tensor:
        """The score head's image score (B,): the maximum of score_map, or with score_wide_sigma the
        larger of the two smoothings' maxima, each as a z-score (score_scale_stats). Scoring scope."""
        return self.scoring(self._image_score, score_features)

    def _image_score(self, score_features: torch.Tensor) -> torch.Tensor:
        if not self.config.score_wide_sigma:
            return self._score_map(score_features).flatten(1).amax(dim=1)
        return self.scale_score(*self.scale_maxima(self.score_distance(score_features)))

    def scale_score(self, narrow: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
        """The image score from the two smoothings' maxima: the larger, each as a z-score (score_scale_stats)."""
        stats = self.score_scale_stats.float()
        return torch.maximum((narrow - stats[0, 0]) / stats[0, 1], (wide - stats[1, 0]) / stats[1, 1])

    def anomaly_map(self, feats: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """The transition residual, fused with the per-position Gaussian if configured, lowered by
        level_fraction of its mean over the image, smoothed: (B, 1, G, G), float32.

        In an fp16 graph everything from here on stays in fp32: the channel reductions and the cosine's
        epsilon (1e-8 is 0 in fp16) are where half precision loses what the score depends on.
        """
        c = self.config
        if c.gaussian_weight <= 0:
            return smooth(self.transition_map(feats, recon), self.smoothing_kernel.float())
        sharp, wide = self.gaussian_zs(self.gaussian_input(feats.float(), recon.float()))
        grid_map = c.gaussian_weight * (sharp if wide is None else torch.maximum(sharp, wide))
        if c.defect_hidden:
            defect = self.defect_z(self.defect_inputs(feats, recon, sharp, wide))
            grid_map = grid_map + (F.relu(defect) if c.defect_rectified else defect)
        if c.transition_weight > 0:  # the default weighs it 0: neither computed nor exported then
            stats = self.fusion_stats.float()
            grid_map = grid_map + c.transition_weight * (self.transition_map(feats, recon) - stats[0, 0]) / stats[0, 1]
        if c.level_fraction:
            grid_map = grid_map - c.level_fraction * grid_map.mean(dim=(2, 3), keepdim=True)
        return smooth(grid_map, self.smoothing_kernel.float())

    def loss(self, feats: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        mse = F.mse_loss(recon, feats)
        cosine = 1.0 - F.cosine_similarity(recon, feats, dim=1).mean()
        return mse + self.config.cosine_weight * cosine

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W), preprocessed -> anomaly maps (B, 1, H, W) and image scores (B,): the map's
        maximum, or with a score head the maximum of its own map."""
        raw, score_features = self.extract_with_score(images)
        feats = self.standardize(raw)
        maps, scores = maps_and_scores(self.scoring(self.anomaly_map, feats, self.reconstruct(feats)),
                                       images.shape[-2:])
        if score_features is not None:
            scores = self.image_score(score_features)
        return maps, scores
