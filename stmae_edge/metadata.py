"""The one versioned metadata schema: written into checkpoints (and ONNX files), read by the runtime.

Plain JSON-able values only, so the same dictionary serialises into a torch checkpoint (which must
load with weights_only=True), ONNX metadata_props and engine sidecars.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from . import __version__
from .checks import parse_document
from .errors import CheckpointError, ConfigError, EngineMismatchError
from .preprocessing import Preprocessing, TrainedSizes
from .scoring import ScoreStats, Thresholds

SCHEMA = "stmae-edge/metadata"
# Version 2 adds `map_stats` (models with a score head). Files without them are still written as
# version 1, so that older runtimes keep reading them; an older runtime refuses a version 2 file rather
# than measure its map on the score's scale. Version 3 adds gray models (preprocessing color "gray"),
# which an older runtime would feed colour images in colour: it refuses them by the version instead.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ONNX_METADATA_KEY = "stmae_edge.metadata"  # metadata_props key holding to_dict() as JSON
PRECISION_KEY = "stmae_edge.precision"  # metadata_props: the graph's compute precision (fp32, fp16, int8)

# What decides a model file's numbers besides its weights and is never edited by the package after
# training: a digest of these entries (METADATA_DIGEST_KEY) is written with them and checked on reading,
# so a hand-edited file is refused instead of giving other verdicts without a word. The thresholds are
# not among them: `stmae-edge threshold --write` moves them. Files from before the digest have none and
# are read as before. It catches accidents and hand edits, not forgery: anyone can recompute a sha256
# (or delete the entry), so a model file from an untrusted source is checked for what it could do
# (bounded sizes, types, no code; checkpoint.py, onnx_files.py), never trusted for what it says.
DIGESTED_KEYS = ("model_family", "config", "preprocessing", "score_stats", "map_stats", "trained_sizes", "model_hash")
METADATA_DIGEST_KEY = "metadata_digest"

# The types of the `training` record's entries that the package reads back from a file (the report,
# verify, calibrate, bench); the rest is shown, never used. A file whose record holds another type
# there is refused on reading, not met with a TypeError deep inside a command.
PROVENANCE_TYPES: dict[str, tuple[type, ...]] = {
    "data_dir": (str,), "train_images": (int,), "holdout_images": (int,), "seconds": (int, float),
    "train_config": (dict,), "score_head": (str,), "color": (str,), "colour_images": (int,),
}

# The exported graph's interface, shared by export, build and the runtime: images (N, 3, H, W) float32
# in; anomaly maps (N, 1, H, W) and image scores (N,) float32 out; N up to MAX_BATCH.
INPUT_NAME, MAP_NAME, SCORE_NAME = "images", "anomaly_map", "score"
MAX_BATCH = 4096


def onnx_precision(model) -> str:
    """The compute precision recorded in an ONNX model's metadata_props (a ModelProto, or the props as a dict)."""
    props = model if isinstance(model, dict) else {p.key: p.value for p in model.metadata_props}
    return props.get(PRECISION_KEY, "fp32")


# The model families a file can hold, by the name its metadata records (models/families.py builds them;
# the names live here, torch-free, for the CLI and calibration)
STMAE_FAMILY = "stmae"
FILTERING_AE_FAMILY = "filtering-ae"
FAMILIES = (STMAE_FAMILY, FILTERING_AE_FAMILY)


@dataclass
class ModelMetadata:
    model_family: str  # one of FAMILIES; the runtime does not need it
    config: dict  # the family's architecture config (STMAEConfig or FilteringAEConfig, to_dict())
    preprocessing: Preprocessing
    score_stats: ScoreStats
    thresholds: Thresholds
    model_hash: str = ""  # sha256 over weights, config and preprocessing; see checkpoint.model_digest
    package_version: str = __version__
    training: dict = field(default_factory=dict)  # data, epochs, seed, losses: provenance only
    # Held-out good maps' maxima, where the image score is not the map's maximum (a score head); see
    # region_stats.
    map_stats: ScoreStats | None = None
    # The training images' sizes, against which the runtime refuses images far off (TrainedSizes).
    trained_sizes: TrainedSizes | None = None

    @property
    def region_stats(self) -> ScoreStats:
        """What a map value is measured against: the good maps' maxima, or the scores where they are the same."""
        return self.map_stats or self.score_stats

    @property
    def schema_version(self) -> int:
        """The oldest version that holds everything this model needs: older runtimes read the rest."""
        if self.preprocessing.color == "gray":
            return 3
        return 2 if self.map_stats is not None else 1

    def check_input_size(self, shape, source) -> None:
        """Raises EngineMismatchError when the network in `source` takes images of another (H, W) than
        the preprocessing recorded with it."""
        if tuple(shape) != tuple(self.preprocessing.input_size):
            raise EngineMismatchError(f"{source}: the network takes {tuple(shape)} images but its metadata says "
                                      f"{self.preprocessing.input_size}; re-export the model")

    def to_dict(self) -> dict:
        extra = {"map_stats": self.map_stats.to_dict()} if self.map_stats is not None else {}
        if self.trained_sizes is not None:
            extra["trained_sizes"] = self.trained_sizes.to_dict()
        d = {
            "schema": SCHEMA,
            "schema_version": self.schema_version,
            "model_family": self.model_family,
            "config": self.config,
            "preprocessing": self.preprocessing.to_dict(),
            "score_stats": self.score_stats.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            **extra,
            "model_hash": self.model_hash,
            "package_version": self.package_version,
            "training": self.training,
        }
        d[METADATA_DIGEST_KEY] = metadata_digest(d)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelMetadata:
        """Raises CheckpointError for anything but this schema with values of the right types and ranges."""
        if not isinstance(d, dict):
            raise CheckpointError(f"metadata is a {type(d).__name__}, not a JSON object: not a stmae-edge model")
        if d.get("schema") != SCHEMA:
            raise CheckpointError(f"metadata schema {d.get('schema')!r} is not {SCHEMA!r}: "
                                  "not a stmae-edge model")
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"metadata schema version {version} is not supported by stmae-edge "
                                  f"{__version__} (it reads {', '.join(map(str, READABLE_VERSIONS))}); "
                                  "a newer stmae-edge made it, or re-export with this version")
        for key in ("config", "training"):
            if not isinstance(d.get(key, {}), dict):
                raise CheckpointError(f"metadata {key!r} is a {type(d[key]).__name__}, not an object; re-create the model file")

        try:
            thresholds = Thresholds.from_dict(d.get("thresholds"))
        except ConfigError as exc:
            # the one part that is edited by hand (a plan's sidecar): say how to mend it, not to retrain
            raise CheckpointError(f"metadata 'thresholds' is malformed ({str(exc)[:200] or type(exc).__name__}): give "
                                  "'image' and 'pixel' as numbers in raw score units, or copy the file again from its "
                                  "source") from exc
        try:
            metadata = cls(
                model_family=str(d["model_family"]),
                config=dict(d["config"]),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                score_stats=ScoreStats.from_dict(d["score_stats"]),
                thresholds=thresholds,
                map_stats=ScoreStats.from_dict(d["map_stats"]) if d.get("map_stats") is not None else None,
                model_hash=str(d.get("model_hash", "")),
                package_version=str(d.get("package_version", "")),
                training=dict(d.get("training", {})),
                trained_sizes=TrainedSizes.from_dict(d["trained_sizes"]) if d.get("trained_sizes") is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CheckpointError(f"metadata is incomplete or malformed ({str(exc)[:200] or type(exc).__name__}); "
                                  "re-create the model file") from exc
        check_provenance(metadata.training)
        # Checked after the entries themselves, whose own messages say more about a malformed one.
        if METADATA_DIGEST_KEY in d and d[METADATA_DIGEST_KEY] != _digest_or_none(d):
            raise CheckpointError("the model's metadata was changed after training (its digest does not match "
                                  f"{', '.join(DIGESTED_KEYS)}): its verdicts would not be the trained model's; train "
                                  "or export the model again (to move thresholds, use `stmae-edge threshold`)")
        return metadata

    def to_onnx_value(self) -> str:
        """What metadata_props[ONNX_METADATA_KEY] holds: compact JSON, keys sorted."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_onnx(cls, model) -> ModelMetadata:
        """From an ONNX file's metadata_props: a path or a loaded onnx.ModelProto."""
        if not hasattr(model, "metadata_props"):
            from .onnx_files import load_onnx

            model = load_onnx(model)
        return cls.from_props({p.key: p.value for p in model.metadata_props})

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """From an ONNX file's metadata_props as a dict (ONNX Runtime's custom_metadata_map is one)."""
        if ONNX_METADATA_KEY not in props:
            raise CheckpointError(f"ONNX file has no '{ONNX_METADATA_KEY}' metadata: not exported by stmae-edge")
        return cls.from_json(props[ONNX_METADATA_KEY])

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        return cls.from_dict(parse_document(text, "the model metadata", CheckpointError))


def check_provenance(training: dict) -> None:
    """Raises CheckpointError where an entry of PROVENANCE_TYPES holds a value of another type."""
    for key, types in PROVENANCE_TYPES.items():
        value = training.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise CheckpointError(f"metadata 'training' entry {key!r} is a {type(value).__name__}, not a "
                                  f"{' or '.join(t.__name__ for t in types)}; the file is corrupt or hand-made, "
                                  "re-create the model file")


def metadata_digest(d: dict) -> str:
    """sha256 over the DIGESTED_KEYS entries of a metadata dictionary, as canonical JSON."""
    chosen = {key: d[key] for key in DIGESTED_KEYS if d.get(key) is not None}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _digest_or_none(d: dict) -> str | None:
    """The digest of a dictionary read from a file, or None where its entries are not JSON values."""
    try:
        return metadata_digest(d)
    except (TypeError, ValueError):
        return None
