"""What a served model takes and returns: one definition for the server, the model repository and the
client. Needs numpy only."""

from __future__ import annotations

import re

from ..errors import ConfigError
from ..metadata import INPUT_NAME, MAP_NAME, SCORE_NAME

IMAGES = INPUT_NAME  # (3, H, W) FP32 per image: preprocessed by the client
FRAMES = "frames"  # (H, W, 3) UINT8 BGR, or (H, W) UINT8 for the _gray model: preprocessed by the server
SCORE = SCORE_NAME  # (1,) FP32: the raw image score
NORMALIZED_SCORE = "normalized_score"  # (1,) FP32: z-score against the held-out good images
IS_ANOMALOUS = "is_anomalous"  # (1,) BOOL: score above the model's image threshold
ANOMALY_MAP = MAP_NAME  # (H, W) FP32 at the model's input size, raw units
ERROR = "error"  # (1,) BYTES: empty, or why this image was not scored (its other outputs are 0)
METADATA = "metadata"  # (1,) BYTES: ModelMetadata.to_dict() as JSON
METADATA_REQUEST = "request"  # (1,) INT32: any value; the _metadata model's only input

OUTPUTS = (SCORE, NORMALIZED_SCORE, IS_ANOMALOUS, ANOMALY_MAP, ERROR)
FRAMES_SUFFIX, GRAY_SUFFIX, METADATA_SUFFIX = "_frames", "_gray", "_metadata"
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
