"""What a served model takes and returns: one definition for the server (`serving/server.py`), the
model repository (`serving/repository.py`) and the client (`runtime/remote.py`). No torch;
at the package's top level so that the runtime's client and the serving side both build on it
and neither imports the other's package for it.

    server / repository --writes--> Triton model NAME (IMAGES) / NAME_frames (FRAMES) / NAME_gray
                                    NAME_metadata -> metadata_document(...)  --read_metadata_document--> RemoteDetector
"""

from __future__ import annotations

import re

from .checks import is_whole
from .errors import CheckpointError, ConfigError, RemoteError, first_line
from .metadata import INPUT_NAME, MAP_NAME, MAX_BATCH, SCORE_NAME, ModelMetadata
from .scoring import Thresholds

IMAGES = INPUT_NAME  # (3, H, W) FP32 per image: preprocessed by the client
FRAMES = "frames"  # (H, W, 3) UINT8 BGR, or (H, W) UINT8 for the _gray model: preprocessed by the server
SCORE = SCORE_NAME  # (1,) FP32: the raw image score
NORMALIZED_SCORE = "normalized_score"  # (1,) FP32: z-score against the model's score_stats
IS_ANOMALOUS = "is_anomalous"  # (1,) BOOL: score above the model's image threshold
ANOMALY_MAP = MAP_NAME  # (H, W) FP32 at the model's input size, raw units
ERROR = "error"  # (1,) BYTES: empty, or why this image was not scored (its other outputs are 0)
METADATA = "metadata"  # (1,) BYTES: ModelMetadata.to_dict() as JSON
METADATA_REQUEST = "request"  # (1,) INT32: any value; the _metadata model's only input

OUTPUTS = (SCORE, NORMALIZED_SCORE, IS_ANOMALOUS, ANOMALY_MAP, ERROR)
FRAMES_SUFFIX, GRAY_SUFFIX, METADATA_SUFFIX = "_frames", "_gray", "_metadata"
# max_batch_size of a served model unless the user gives another (`serve`, `triton-repo`); also what a
# metadata document from before its "max_batch" entry means. At most MAX_BATCH, the runtime's limit.
DEFAULT_MAX_BATCH = 8
MAX_INSTANCES = 16  # model instances one `serve` starts, each its own runtime session
MAX_QUEUE_DELAY_US = 10_000_000  # how long Triton may wait to fill a batch: 10 s, far past any line's
# Triton model names: letters, digits, dots, underscores and dashes.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Triton's model config parameter that carries the metadata in a repository written by triton-repo.
METADATA_PARAMETER = "stmae_edge_metadata"


def check_model_name(name: str) -> str:
    """The name, if Triton accepts it as a model name.

    Raises:
        ConfigError: it is empty, too long or has characters other than letters, digits, '.', '_', '-'.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"model name {name!r}: use 1 to 100 letters, digits, '.', '_' or '-' (starting with a "
                          "letter or digit); give one with --name")
    return name


def model_name_for(path) -> str:
    """The served name of a model file: its stem with other characters replaced by '_'."""
    from pathlib import Path

    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)[:100]
    return check_model_name(stem if stem and stem[0].isalnum() else f"m{stem}"[:100])


def check_max_batch(max_batch: int, option: str = "--max-batch") -> int:
    """The largest batch a served model takes, if the runtime can take it too.

    Raises:
        ConfigError: not a whole number from 1 to MAX_BATCH.
    """
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= MAX_BATCH:
        raise ConfigError(f"{option} must be a whole number from 1 to {MAX_BATCH}, got {max_batch!r}")
    return max_batch


def without_folders(training: dict) -> dict:
    """The training record without the paths of the machine that trained it (outside the metadata digest)."""
    kept = {key: value for key, value in training.items() if key != "data_dir"}
    if kept.get("backbone_weights") not in (None, "imagenet", "random"):  # a weight file's path
        kept["backbone_weights"] = "a weight file"
    if isinstance(kept.get("holdout"), str) and kept["holdout"].startswith("from "):
        kept["holdout"] = "from a folder of good images of their own"
    if isinstance(kept.get("train_config"), dict):
        kept["train_config"] = {k: v for k, v in kept["train_config"].items() if k not in ("holdout_dir", "defects_dir")}
    if isinstance(kept.get("defect_head"), dict):  # train --defects: the labelled folder's path
        kept["defect_head"] = {k: v for k, v in kept["defect_head"].items() if k != "folder"}
    return kept


def metadata_document(name: str, max_batch: int, metadata: ModelMetadata, thresholds: Thresholds,
                      runtime: dict | None = None) -> dict:
    """What the NAME_metadata model returns (as JSON), and all a client needs to preprocess and
    postprocess as the in-process Detector does: the model's metadata, the thresholds in force (they
    may differ from the metadata's if the server's were changed), the largest batch, and, from a live
    server, what it runs on. The training's folders are left out: anyone who reaches the server may read
    this, and a client needs none of them."""
    served = metadata.to_dict()
    served["training"] = without_folders(served.get("training", {}))
    document = {"name": name, "max_batch": max_batch, "metadata": served, "thresholds": thresholds.to_dict()}
    if runtime is not None:
        document["runtime"] = runtime
    return document


def read_metadata_document(document: dict, what: str) -> tuple[ModelMetadata, Thresholds, int, dict]:
    """(metadata, thresholds, max batch, runtime) from a metadata document that metadata_document wrote,
    as a served model returns it; `what` names it in messages.

    Raises:
        RemoteError: a part is missing or malformed, named: the server does not serve what
            `stmae-edge serve` or `stmae-edge triton-repo` wrote.
    """
    remedy = ("restart the server with `stmae-edge serve`, or write the repository again with "
              "`stmae-edge triton-repo`, with this version of stmae-edge")
    if "metadata" not in document:
        raise RemoteError(f"{what} has no 'metadata' entry; {remedy}")
    try:
        metadata = ModelMetadata.from_dict(document["metadata"])
    except CheckpointError as exc:
        raise RemoteError(f"{what}: {exc}") from None
    thresholds = metadata.thresholds
    if "thresholds" in document:
        try:
            thresholds = Thresholds.from_dict(document["thresholds"])
        except ConfigError as exc:
            raise RemoteError(f"{what} has malformed 'thresholds' ({first_line(exc, 200)}); {remedy}") from None
    # Absent in documents from before the entry: `stmae-edge serve`'s default
    max_batch = document.get("max_batch", DEFAULT_MAX_BATCH)
    if not is_whole(max_batch) or not 1 <= max_batch <= MAX_BATCH:
        raise RemoteError(f"{what} gives max_batch {max_batch!r}, not a whole number from 1 to {MAX_BATCH}; {remedy}")
    runtime = document.get("runtime", {})
    if not isinstance(runtime, dict):
        raise RemoteError(f"{what} has a 'runtime' entry that is a {type(runtime).__name__}, not an object; {remedy}")
    return metadata, thresholds, int(max_batch), runtime
