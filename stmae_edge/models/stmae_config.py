"""ST-MAE's settings (STMAEConfig) and its named presets, as data: what `train --preset` chooses
between, what a checkpoint's metadata records (to_dict / from_dict), and what models/stmae.py builds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import ConfigError
from .backbones import DEFAULT_LAYERS

RESIDUALS = ("mse", "mse_cos")
GAUSSIAN_INPUTS = ("features", "residual")
MAX_BLOCKS = 64  # transformer blocks in the encoder or the decoder; the paper preset has 12 and 8
MAX_DEFECT_HIDDEN = 1024  # hidden units of the labelled-defect head; train --defects gives it 128


@dataclass(frozen=True)
class STMAEConfig:
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = DEFAULT_LAYERS["efficientnet_lite0"]
    input_size: int = 256
    grid: int = 32  # feature map side after resizing every layer to one grid
    patch: int = 2  # feature patch side: (grid / patch)^2 tokens
    mask_unit: int = 1  # tokens per side of a masked block, in training and in the eval checkerboard
    embed_dim: int = 160
    depth: int = 4
    heads: int = 4
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mlp_ratio: float = 2.0
    smoothing_sigma: float = 0.5  # in grid cells: 4 input pixels at 256 / 32
    cosine_weight: float = 1.0  # loss = mse + cosine_weight * (1 - cos)
    residual: str = "mse_cos"  # per-position residual: "mse", or "mse_cos" = mse * (1 - cos)
    position_norm: bool = True  # residual as a z-score against good images at the same position
    # A Gaussian per grid position, scored by Mahalanobis distance, fused into the map with this weight;
    # 0 = the transition residual alone.
    gaussian_weight: float = 0.0
    gaussian_input: str = "features"  # what the Gaussian models: "features", or "residual" (features - prediction)
    transition_weight: float = 1.0  # weight of the scalar transition residual in a fused map
    gaussian_dim: int = 0  # inputs projected to this many principal components first; 0 = all channels
    gaussian_eps: float = 0.01  # added to each covariance's diagonal (standardised features: variance ~1)
    # Each channel of the Gaussian's input divided by its std over the image's own positions (not
    # centred): a tile whose residual is larger everywhere (a rougher surface, more sensor noise) no
    # longer lights up as a whole, and a small local departure stands out against the rest of its tile.
    # Off by default: a defect covering a fraction f of the tile raises that std itself, which caps it
    # near 1 / sqrt(f (1 - f)) standard units, so large defects fade (docs/BENCHMARKS.md, issue 15).
    gaussian_scale: bool = False
    # A second, wide Gaussian per position on the Gaussian's input averaged over the wide_window x
    # wide_window cells around each position (odd; 0 = none), projected to wide_dim principal
    # components. The map is then the larger of the two Gaussians' z-scores: a region whose texture is
    # off as a whole (magnetic_tile's uneven bands) is steadier over many cells than in one, while the
    # sharp Gaussian keeps small defects sharp (docs/BENCHMARKS.md, issue 15).
    wide_window: int = 0
    wide_dim: int = 32
    # Each image's fused map lowered by this fraction of its own mean over the grid (0 = not). A tile
    # whose surface is unusual all over (another batch, another exposure: magnetic_tile's defective
    # tiles) no longer lifts its every pixel above other tiles' defects, and a region is measured
    # partly against the rest of its own tile; a defect covering the whole tile keeps 1 - level_fraction
    # of its level. Needs the Gaussian map (docs/BENCHMARKS.md, issue 15, fifteenth session).
    level_fraction: float = 0.0
    # The image score head: a Gaussian per position of these (deeper) layers' raw features, on a coarser
    # score_grid, projected to score_dim principal components; score = max of its smoothed distance map.
    # () = the score is the anomaly map's maximum.
    score_layers: tuple[str, ...] = ()
    score_grid: int = 16
    score_dim: int = 128
    score_smoothing_sigma: float = 0.5  # in score grid cells
    # A second, wider smoothing of the head's distance map (score grid cells); 0 = none. With it the
    # score is the larger of the two smoothed maps' maxima, each as a z-score on held-out good images:
    # a defect that shows as one strong cell and one that shows as a few weaker ones both count.
    score_wide_sigma: float = 0.0
    # Each of the head's channels standardised over the image's own positions before the projection:
    # the head then judges how the tile's texture is laid out, not its overall level (score_inputs).
    score_standardize: bool = False
    # Each image's intensities brought to the training images' mean and std inside the graph, before
    # the backbone (models/intensity.py); the target is fitted at training.
    intensity_norm: bool = False
    # A head learnt from labelled defects (`train --defects`): a classifier of each grid cell, with this
    # many hidden units, on what the map is made of (the features, the residual and its neighbourhood
    # means, the Gaussians' z-scores); its output, a z-score on held-out good images, is added to the map.
    # 0 (every preset) = none: the model learns from good images alone (docs/BENCHMARKS.md, issue 15).
    defect_hidden: int = 0
    # The head's z-score added only where it is positive: it raises the cells it takes for defects and
    # takes nothing from the others, so a kind of defect that the labelled images lack is not hidden by a
    # head that learnt to call it normal (magnetic_tile, labelled sets without uneven: pixel AUROC -3.7
    # to -10.5 points signed, -0.1 to -2.3 rectified; docs/BENCHMARKS.md). Heads trained before it add
    # the signed z-score.
    defect_rectified: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.patch <= self.grid <= self.input_size:
            raise ConfigError(f"need 1 <= patch ({self.patch}) <= grid ({self.grid}) <= input size ({self.input_size})")
        if not (0 <= self.depth <= MAX_BLOCKS and 0 <= self.decoder_depth <= MAX_BLOCKS):
            raise ConfigError(f"depth {self.depth} and decoder depth {self.decoder_depth} must be within 0..{MAX_BLOCKS}")
        if self.grid % self.patch:
            raise ConfigError(f"grid {self.grid} is not a multiple of patch {self.patch}")
        side = self.grid // self.patch
        if self.mask_unit < 1 or side % self.mask_unit or (side // self.mask_unit) ** 2 % 2:
            raise ConfigError(f"the {side} x {side} token grid must split into an even number of "
                              f"{self.mask_unit} x {self.mask_unit} blocks")
        if self.residual not in RESIDUALS:
            raise ConfigError(f"unknown residual {self.residual!r}; choose one of {RESIDUALS}")
        if self.embed_dim % self.heads or self.decoder_dim % self.decoder_heads:
            raise ConfigError("embed_dim and decoder_dim must be multiples of their head counts")
        if not (self.gaussian_weight >= 0 and self.transition_weight >= 0 and self.gaussian_dim >= 0
                and self.gaussian_eps > 0):
            raise ConfigError("fusion weights and gaussian dim must not be negative, and gaussian eps must be positive")
        if self.score_layers and not (self.score_grid >= 1 and self.score_dim >= 1 and self.score_smoothing_sigma > 0
                                      and self.score_wide_sigma >= 0):
            raise ConfigError("the score head's grid, dimension and smoothing must be positive")
        if self.score_layers and self.grid % self.score_grid:
            raise ConfigError(f"the score head's grid {self.score_grid} must divide the grid {self.grid}")
        if self.wide_window and not (self.gaussian_weight > 0 and self.wide_window % 2 == 1 and self.wide_dim >= 1):
            raise ConfigError("the wide Gaussian needs the Gaussian map (gaussian_weight > 0), an odd wide_window "
                              "and a positive wide_dim")
        if self.gaussian_input not in GAUSSIAN_INPUTS:
            raise ConfigError(f"unknown gaussian input {self.gaussian_input!r}; choose one of {GAUSSIAN_INPUTS}")
        if not 0 <= self.defect_hidden <= MAX_DEFECT_HIDDEN or (self.defect_hidden and not self.wide_window):
            raise ConfigError(f"defect_hidden {self.defect_hidden!r} must be within 0..{MAX_DEFECT_HIDDEN}, and above 0 "
                              "only with the Gaussian map's wide window (the head reads both Gaussians)")
        if self.defect_rectified and not self.defect_hidden:
            raise ConfigError("defect_rectified needs the labelled-defect head (defect_hidden above 0)")
        if not 0 <= self.level_fraction < 1 or (self.level_fraction and self.gaussian_weight <= 0):
            raise ConfigError(f"level_fraction {self.level_fraction!r} must be in [0, 1), and above 0 only with "
                              "the Gaussian map (gaussian_weight > 0)")

    @property
    def tokens_per_side(self) -> int:
        return self.grid // self.patch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["score_layers"] = list(self.score_layers)
        if not self.defect_hidden:
            # Written only with a head: models trained on good images alone keep the config dictionary,
            # and so the digest, of earlier versions, which read them as before
            del d["defect_hidden"]
        if not self.defect_rectified:  # so do heads trained before it
            del d["defect_rectified"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> STMAEConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}: made by a newer stmae-edge?")
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        d["score_layers"] = tuple(d.get("score_layers", ()))
        return cls(**d)


# The default score head's layers: deeper than the map's, where a whole tile's texture and brightness
# show (docs/BENCHMARKS.md, issue 15: validation image AUROC 97.0 -> 97.9, crack 92.5 -> 95.2).
DEEP_SCORE_LAYERS = ("blocks.4", "blocks.10", "blocks.14")
SCORE_LAYERS: dict[str, tuple[str, ...]] = {"efficientnet_lite0": DEEP_SCORE_LAYERS}  # by backbone, where measured

# Size presets. "small" trains on 2 CPU cores in minutes: a 32x32 feature grid with 2x2 patches keeps
# the paper's 16x16 tokens of 16 input pixels each, at a quarter of the projection cost of 64x64 with
# 4x4 patches (0.42 s against 1.1 s per step of 16 on 2 cores). "paper" follows the published recipe:
# VGG19 relu1_2..relu4_4 on a 64x64 grid, a 768-wide, 12-deep encoder, 512-wide 8-deep decoder.
PRESETS: dict[str, STMAEConfig] = {
    "tiny": STMAEConfig(input_size=64, grid=16, patch=2, embed_dim=32, depth=1, heads=2,
                        decoder_dim=32, decoder_depth=1, decoder_heads=2, mlp_ratio=2.0, mask_unit=2,
                        gaussian_weight=1.0, gaussian_input="residual", transition_weight=0.0, gaussian_dim=16,
                        score_layers=DEEP_SCORE_LAYERS, score_grid=4, score_dim=8, score_standardize=True,
                        score_wide_sigma=1.0, wide_window=11, wide_dim=8, level_fraction=0.5),
    # The wide Gaussian over 21 x 21 of the 32 x 32 cells, on 32 principal components (fourteenth
    # session), and the map lowered by half its mean (fifteenth): each chosen on the validation halves
    # of the given split and of unseen tiles (docs/BENCHMARKS.md).
    "small": STMAEConfig(mask_unit=4, gaussian_weight=1.0, gaussian_input="residual", transition_weight=0.0,
                         score_layers=DEEP_SCORE_LAYERS, score_standardize=True, score_wide_sigma=2.0,
                         wide_window=21, wide_dim=32, level_fraction=0.5),
    # The default before the level subtraction (fourteenth session).
    "small-wide-map": STMAEConfig(mask_unit=4, gaussian_weight=1.0, gaussian_input="residual",
                                  transition_weight=0.0, score_layers=DEEP_SCORE_LAYERS, score_standardize=True,
                                  score_wide_sigma=2.0, wide_window=21, wide_dim=32),
    # The default before the wide Gaussian (thirteenth session): the sharp per-position Gaussian alone.
    "small-sharp-map": STMAEConfig(mask_unit=4, gaussian_weight=1.0, gaussian_input="residual",
                                   transition_weight=0.0, score_layers=DEEP_SCORE_LAYERS, score_standardize=True,
                                   score_wide_sigma=2.0),
    # The default before the score head's second, wider smoothing (twelfth session, docs/BENCHMARKS.md).
    "small-one-scale": STMAEConfig(mask_unit=4, gaussian_weight=1.0, gaussian_input="residual",
                                   transition_weight=0.0, score_layers=DEEP_SCORE_LAYERS, score_standardize=True),
    # The sixth session's default (the sharp map, one head smoothing) with each image brought to one
    # brightness and contrast first: for lines whose lighting or parts' brightness varies; costs
    # localisation on magnetic_tile (docs/BENCHMARKS.md).
    "small-intensity-norm": STMAEConfig(mask_unit=4, gaussian_weight=1.0, gaussian_input="residual",
                                        transition_weight=0.0, score_layers=DEEP_SCORE_LAYERS,
                                        score_standardize=True, intensity_norm=True),
    # The sixth session's default (the sharp map, one head smoothing) with the map's residual scaled per
    # image: more AUPRO, less pixel AUROC on magnetic_tile, and large defects fade (docs/BENCHMARKS.md).
    "small-map-scaled": STMAEConfig(mask_unit=4, gaussian_weight=1.0, gaussian_input="residual",
                                    transition_weight=0.0, gaussian_scale=True, score_layers=DEEP_SCORE_LAYERS,
                                    score_standardize=True),
    # The default before the head's features were standardised per image (2026-11-28).
    "small-head-raw": STMAEConfig(mask_unit=4, gaussian_weight=1.0, gaussian_input="residual",
                                  transition_weight=0.0, score_layers=DEEP_SCORE_LAYERS),
    # The default before the score head (2026-11-28): the same map, and the image score as its maximum.
    "small-map-score": STMAEConfig(mask_unit=4, gaussian_weight=1.0, gaussian_input="residual",
                                   transition_weight=0.0),
    # The default until 2026-11-28: the transition residual alone, token-wise masking.
    "transition-only": STMAEConfig(),
    "paper": STMAEConfig(backbone="vgg19", layers=DEFAULT_LAYERS["vgg19"], grid=64, patch=4, embed_dim=768,
                         depth=12, heads=12, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                         mlp_ratio=4.0, smoothing_sigma=1.0),
}


def preset(name: str, **overrides) -> STMAEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
