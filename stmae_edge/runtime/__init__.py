"""The edge runtime: what runs on the line. numpy, OpenCV and the chosen backend; never torch."""

from .backends import BACKENDS, open_backend
from .detector import Detector
from .postprocess import Detection, Region
from .remote import RemoteDetector, RemoteError

__all__ = ["BACKENDS", "Detection", "Detector", "Region", "RemoteDetector", "RemoteError", "open_backend"]
