"""What the fuzzer drives (benchmarks/fuzz_inputs.py, atheris) and the tests replay (test_fuzz_corpus.py):
every reader of user-supplied input, fed arbitrary bytes, may raise only the package's typed errors.

    image       bytes -> preprocessing.decode -> check_image -> Preprocessing.tensor      (InvalidImageError)
    metadata    bytes -> ModelMetadata.from_json / from_onnx (ONNX files and their JSON)  (CheckpointError)
    sidecar     bytes -> an engine sidecar beside a plan -> engine_plan.read_plan         (EngineMismatchError)
    linescan    bytes -> blocks of any shape, dtype and width -> StreamingInspector.push  (InvalidImageError)
    detector    bytes -> Detector(...) and predict(...) arguments of any type or value    (StmaeError)

Bytes that start with an odd byte are decoded as they are; the others steer a structure-aware
mutation of a valid document (a JSON value replaced by one of another type or range), which reaches
the checks behind the parser far more often than random text does.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from stmae_edge.errors import StmaeError

TARGETS = ("image", "metadata", "sidecar", "linescan", "detector")
ODD_VALUES = [None, True, False, 0, -1, 1, 2, 7, 2**31, 2**63, -2**63, 10**400, 0.5, -1e-9, 1e308, math.nan,
              math.inf, -math.inf, "", "x", "12", "1e9", "nan", [], [1], [1, 2, 3], {}, {"a": 1}, [[1], [2]]]


class Bytes:
    """A small stand-in for atheris.FuzzedDataProvider: the same bytes give the same choices, with or
    without atheris installed."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            return 0
        self.at += 1
        return self.data[self.at - 1]

    def int_in(self, low: int, high: int) -> int:
        value = int.from_bytes(bytes(self.byte() for _ in range(4)), "little")
        return low + value % (high - low + 1)

    def pick(self, options):
        return options[self.int_in(0, len(options) - 1)]

    def rest(self) -> bytes:
        rest, self.at = self.data[self.at:], len(self.data)
        return rest


def mutate(document, steer: Bytes, edits: int = 3):
    """A copy of a JSON document with a few values replaced by values of other types or ranges."""
    document = json.loads(json.dumps(document))
    for _ in range(steer.int_in(1, edits)):
        node, parent, key = document, None, None
        for _depth in range(6):
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
            if not children:
                break
            key, child = steer.pick(children)
            parent = node
            if not isinstance(child, (dict, list)) or steer.byte() % 3 == 0:
                break
            node = child
        if parent is None:
            continue
        if steer.byte() % 8 == 0 and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = copy.deepcopy(steer.pick(ODD_VALUES))
    return document


def _text(data: bytes, steer: Bytes, valid: dict) -> str:
    if data[:1] and data[0] % 2:
        return data[1:].decode("utf-8", "replace")
    return json.dumps(mutate(valid, steer), allow_nan=True)


# --- the targets ----------------------------------------------------------------------------------
def fuzz_image(data: bytes, context: dict) -> None:
    from stmae_edge.errors import InvalidImageError
    from stmae_edge.preprocessing import Preprocessing, check_image, decode

    pre = Preprocessing(input_size=(32, 32), max_pixels=4 * 1024 * 1024)  # small: the fuzzer's memory
    try:
        array = decode(np.frombuffer(data, np.uint8), "fuzz", pre.max_pixels)
        check_image(array, "fuzz", pre.max_pixels)
        pre.tensor(array)
    except InvalidImageError:
        pass


def fuzz_metadata(data: bytes, context: dict) -> None:
    from stmae_edge.errors import CheckpointError
    from stmae_edge.metadata import ModelMetadata

    steer = Bytes(data[1:])
    try:
        if data[:1] == b"\x02":  # an ONNX file of arbitrary bytes
            path = Path(context["tmp"]) / "fuzz.onnx"
            path.write_bytes(data[1:])
            ModelMetadata.from_onnx(path)
        else:
            ModelMetadata.from_json(_text(data, steer, context["metadata"]))
    except CheckpointError:
        pass


def fuzz_sidecar(data: bytes, context: dict) -> None:
    from stmae_edge.engine_plan import read_plan, sidecar_path
    from stmae_edge.errors import EngineMismatchError

    plan = Path(context["tmp"]) / "fuzz.plan"
    plan.write_bytes(context["plan_bytes"])
    sidecar_path(plan).write_text(_text(data, Bytes(data[1:]), context["sidecar"]), errors="surrogatepass")
    try:
        read_plan(plan)
    except EngineMismatchError:
        pass


def fuzz_linescan(data: bytes, context: dict) -> None:
    from stmae_edge.errors import ConfigError, InvalidImageError
    from stmae_edge.runtime.linescan import StreamingInspector

    steer = Bytes(data)
    detector = context["detector"]
    tile = detector.preprocessing.input_size[1]
    try:
        inspector = StreamingInspector(detector, overlap=steer.pick([0, 4, 8, -1, 1.5, tile, "8"]),
                                       width=steer.pick([None, tile, tile + 7, 2 * tile, 0, -3, 2.5]))
        for _ in range(steer.int_in(1, 3)):
            rows, width = steer.int_in(0, 70), steer.pick([0, 1, tile - 1, tile, tile + 5, 2 * tile + 3])
            channels = steer.pick([None, 1, 2, 3, 4])
            dtype = steer.pick([np.uint8, np.uint16, np.float32, np.int32, np.bool_])
            shape = (rows, width) if channels is None else (rows, width, channels)
            count = int(np.prod(shape))
            raw = (steer.rest() * (1 + count * 4 // max(1, len(data))))[:count * np.dtype(dtype).itemsize]
            block = np.frombuffer(raw.ljust(count * np.dtype(dtype).itemsize, b"\0"), dtype).reshape(shape)
            if steer.byte() % 5 == 0:
                block = block.T if block.ndim == 2 else block[::-1]
            inspector.push(block)
        inspector.flush()
    except (InvalidImageError, ConfigError):
        pass


def fuzz_detector(data: bytes, context: dict) -> None:
    from stmae_edge.runtime import Detector

    steer = Bytes(data)
    names = ("backend", "batch_size", "min_region_area", "threads", "bit_depth")
    kwargs = {name: steer.pick(ODD_VALUES + ["auto", "ort-cpu", 16, 12]) for name in names if steer.byte() % 2}
    image = steer.pick([np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint16) + 9, "missing.png", 3, None,
                        [np.zeros((8, 8, 3), np.uint8)], np.zeros((2, 40, 40), np.uint8)])
    predict_kwargs = {name: steer.pick(ODD_VALUES) for name in ("image_threshold", "pixel_threshold", "sigma")
                      if steer.byte() % 2}
    try:
        detector = Detector(context["onnx"], **kwargs) if kwargs else context["detector"]
        detector.predict(image, **predict_kwargs)
        if steer.byte() % 4 == 0:
            detector.thresholds = steer.pick(ODD_VALUES)
    except StmaeError:
        pass


FUNCTIONS = {"image": fuzz_image, "metadata": fuzz_metadata, "sidecar": fuzz_sidecar,
             "linescan": fuzz_linescan, "detector": fuzz_detector}


def make_context(tiny_onnx: Path) -> dict:
    """Valid documents to mutate and a Detector, from a small exported model."""
    import hashlib

    from stmae_edge.engine_plan import SIDECAR_FORMAT
    from stmae_edge.metadata import ModelMetadata
    from stmae_edge.runtime import Detector

    metadata = ModelMetadata.from_onnx(tiny_onnx).to_dict()
    plan_bytes = b"not a real plan: read_plan checks the sidecar before TensorRT sees the bytes"
    sidecar = {"format": SIDECAR_FORMAT, "metadata": metadata, "precision": "fp16",
               "plan": {"sha256": hashlib.sha256(plan_bytes).hexdigest(), "size_bytes": len(plan_bytes)},
               "batch": {"min": 1, "opt": 8, "max": 32}, "tensorrt": {"flavour": "tensorrt", "version": "10.0"}}
    return {"tmp": tempfile.mkdtemp(prefix="stmae-fuzz-"), "metadata": metadata, "sidecar": sidecar,
            "plan_bytes": plan_bytes, "onnx": tiny_onnx, "detector": Detector(tiny_onnx, "ort-cpu")}
