"""Typed errors. Each message says what was wrong and what to do; the CLI prints it as one line."""

import re


class StmaeError(Exception):
    """Base class of every error this package raises on purpose."""


# Where a C++ library (ONNX Runtime) raised, before what it says: the source file and line, then the
# function, qualified (a::b), as Linux builds write it ("void a::f(A&, const B&) const [with T = float]")
# or Windows builds ("a::f", no arguments). Only a name with "::" is taken for the function: free text
# after the line number ("file.cpp:5 error in f() here") is kept.
_CPP_LOCATION = re.compile(
    r"^\S+\.(?:cc|cpp|cxx|cu|h|hpp):\d+\s+"
    r"(?:(?:[\w:<>*&]+\s+)?[\w~<>]*(?:::[\w~<>]+)+"
    r"(?:\([^()\n]*\))?(?:\s+const)?(?:\s+\[with [^\]\n]*\])?\s+)?")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """What a one-line error quotes of a library's exception: its first line, without the C++ source
    location and function a native library puts first (it filled the limit before the reason), cut to
    `limit` characters; or its type's name where it has no text (an empty message must not become an
    IndexError)."""
    text = str(exc).strip()
    line = _CPP_LOCATION.sub("", text.splitlines()[0]) if text else ""
    return (line or type(exc).__name__)[:limit]


class InvalidImageError(StmaeError, ValueError):
    """An image could not be read or is not usable (corrupt, empty, wrong channels, too large, NaN)."""


class DatasetError(StmaeError):
    """A dataset folder does not have the expected (MVTec AD) layout or has no usable images."""


class NothingScoredError(DatasetError):
    """None of the images given could be scored; `errors` says why for each, as {"source", "error"}."""

    def __init__(self, message: str, errors: list[dict]):
        super().__init__(message)
        self.errors = errors


class CheckpointError(StmaeError):
    """A model file is missing, corrupt, from an incompatible version or fails its checksum."""


class WeightsError(StmaeError):
    """Pretrained backbone weights are missing, unreachable or do not match the architecture."""


class ConfigError(StmaeError, ValueError):
    """A configuration value is unknown or out of range."""


class TrainingError(StmaeError):
    """Training did not produce a usable model: the loss, or the model's output, is NaN or infinite."""


class OutputError(StmaeError):
    """An output file or folder cannot be written."""


class ExportError(StmaeError):
    """Export failed, or the exported graph fails its checks."""


class VerificationError(StmaeError):
    """An exported model does not reproduce the PyTorch model within tolerance, or belongs to another model."""


class BackendError(StmaeError):
    """An inference backend cannot be used here: missing package, no GPU, or a provider that would fall back."""


class PredictionStoppedError(BackendError):
    """The backend failed part-way through scoring a folder (`predict_to_folder`): the images scored
    before it are kept. `summary` is the run as written to results.json, whose `stopped` names the
    error and lists the files not scored."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class EngineMismatchError(BackendError):
    """An engine plan does not match its sidecar, the model, or the TensorRT installed here."""


class TensorRTMissingError(BackendError):
    """Neither TensorRT nor TensorRT for RTX can be imported."""


class TensorRTUnloadableError(TensorRTMissingError):
    """TensorRT is installed but cannot load here (its libraries are not found)."""


class RemoteError(BackendError):
    """A server refused a request or could not be reached; the message is the server's.
    `status` is the HTTP status of a refusal, None when no answer came."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ModelFileMissingError(CheckpointError, BackendError):
    """No model file at the path given. A CheckpointError where a checkpoint is read, a BackendError
    where a backend opens one: callers that catch either kind keep catching it."""
