"""A Detector whose network runs on a Triton Inference Server: the same Detections as in-process.

    detector = RemoteDetector("http://inspection-server:8000", "model")    # or "grpc://host:8001"
    results = detector.predict(["part1.png", frame])                       # list of Detections

    images ──> load_image + the model's Preprocessing (here, the one definition) ──> (N, 3, H, W)
           ──> server: NAME (stmae-edge serve) or NAME from a triton-repo repository
           ──> maps and scores ──> postprocess (here, as the in-process Detector) ──> Detections

HTTP needs nothing beyond numpy: KServe v2 with Triton's binary tensor extension over urllib. gRPC
uses tritonclient (the serve extra). The model's metadata comes from the server: the NAME_metadata
model of `stmae-edge serve`, or the config parameter that `stmae-edge triton-repo` writes.
"""

from __future__ import annotations

import http.client
import json
import struct
import urllib.error
import urllib.request
from typing import Sequence, Union

import numpy as np

from ..errors import BackendError, ConfigError
from ..metadata import ModelMetadata
from ..preprocessing import ImageInput
from ..scoring import Thresholds
from ..serving import protocol as p
from .detector import as_items, balanced_chunks, decode_batch
from .postprocess import Detection, postprocess, resolve_thresholds

DATATYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "BOOL": np.bool_, "UINT8": np.uint8,
             "UINT16": np.uint16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64}
MAX_RESPONSE_BYTES = 1 << 31


class RemoteError(BackendError):
    """The server refused a request or could not be reached; the message is the server's.
    `status` is the HTTP status of a refusal, None when no answer came."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RemoteDetector:
    def __init__(self, url: str, model: str, *, timeout: float = 60.0, min_region_area: int = 1,
                 batch_size: int | None = None):
        """Connect to a served model and read its metadata.

        Args:
            url: http://HOST:PORT (Triton's HTTP endpoint) or grpc://HOST:PORT.
            model: the served model's name (`stmae-edge serve` prints it).
            timeout: seconds per request.
            batch_size: most images per request (default and cap: the server's max batch).

        Raises:
            ConfigError: a malformed url or model name. RemoteError: the server or model is not there.
        """
        self.model = p.check_model_name(model)
        scheme, _, address = url.partition("://")
        if scheme not in ("http", "grpc") or not address or "/" in address.rstrip("/"):
            raise ConfigError(f"server url {url!r}: give http://HOST:PORT or grpc://HOST:PORT")
        self.url, self.protocol, self.timeout = url.rstrip("/"), scheme, float(timeout)
        self.min_region_area = min_region_area
        self._grpc = self._grpc_client(address.rstrip("/")) if scheme == "grpc" else None
        self._outputs = [p.SCORE, p.ANOMALY_MAP]  # and ERROR from a `stmae-edge serve` server
        document = self._metadata_document()
        self.metadata = ModelMetadata.from_dict(document["metadata"])
        self.preprocessing = self.metadata.preprocessing
        self.score_stats = self.metadata.score_stats
        self.map_stats = self.metadata.region_stats
        self.thresholds = Thresholds.from_dict(document["thresholds"]) if "thresholds" in document \
            else self.metadata.thresholds
        self.max_batch = int(document.get("max_batch", 8))
        self.batch_size = self.max_batch if batch_size is None else max(1, min(int(batch_size), self.max_batch))
        self.model_path = f"{self.url}/v2/models/{self.model}"
        self._runtime = document.get("runtime", {})

    @property
    def info(self) -> dict:
        """What answers: the server, the model, and the runtime the server reported."""
        return {"backend": f"triton ({self.protocol})", "device": f"{self.url} ({self._runtime.get('device', 'server')})",
                "model": self.model, "server_runtime": self._runtime}

    # -- the Detector API -------------------------------------------------------------------------
    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], *, image_threshold: float | None = None,
                pixel_threshold: float | None = None, sigma: float | None = None):
        """As Detector.predict: one image or a list (paths or arrays) -> Detection or list of them."""
        items, single = as_items(images)
        thresholds = resolve_thresholds(self.thresholds, self.score_stats, image_threshold, pixel_threshold, sigma,
                                        self.map_stats)
        detections: list[Detection] = []
        for start, stop in balanced_chunks(len(items), self.batch_size):
            batch, sizes, sources = decode_batch(items[start:stop], start, self.preprocessing)
            maps, scores = self.run_tensors(batch)
            maps = self.preprocessing.to_image_frame(maps, sizes)
            detections += postprocess(maps, scores, sizes, sources, thresholds, self.score_stats, self.min_region_area,
                                      self.map_stats)
        return detections[0] if single else detections

    __call__ = predict

    def run_tensors(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images (N, 3, H, W) float32 -> maps (N, H, W) and raw scores (N,), from the server."""
        outputs = self.infer(self.model, {p.IMAGES: np.ascontiguousarray(batch, np.float32)}, self._outputs)
        maps, scores = outputs[p.ANOMALY_MAP], outputs[p.SCORE].reshape(len(batch))
        # a triton-repo model answers (N, 1, H, W); copied: the wire's arrays are read-only views
        maps = np.array(maps.reshape(len(batch), *maps.shape[-2:]), dtype=np.float32)
        scores = np.array(scores, dtype=np.float32)
        errors = outputs.get(p.ERROR)
        if errors is not None:
            for i, message in enumerate(errors.reshape(-1)):
                if message:
                    raise RemoteError(f"image {i}: {message.decode(errors='replace')}")
        return maps, scores

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()

    def __enter__(self) -> "RemoteDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the wire ---------------------------------------------------------------------------------
    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One inference request: named arrays in, named arrays out (BYTES as object arrays of bytes)."""
        if self._grpc is not None:
            return self._infer_grpc(model, inputs, outputs)
        return self._infer_http(model, inputs, outputs)

    def _infer_http(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        header = {"inputs": [], "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs]}
        blobs = []
        for name, array in inputs.items():
            datatype = next((k for k, v in DATATYPES.items() if array.dtype == v), None)
            if datatype is None:
                raise ConfigError(f"input {name}: dtype {array.dtype} is not sent by this client")
            blob = np.ascontiguousarray(array).tobytes()
            header["inputs"].append({"name": name, "shape": list(array.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": len(blob)}})
            blobs.append(blob)
        head = json.dumps(header).encode()
        request = urllib.request.Request(f"{self.url}/v2/models/{model}/infer", data=head + b"".join(blobs),
                                         headers={"Inference-Header-Content-Length": str(len(head)),
                                                  "Content-Type": "application/octet-stream"})
        body, response_headers = self._http(request)
        try:
            length = int(response_headers.get("Inference-Header-Content-Length") or len(body))
            document = json.loads(body[:length])
            offset, result = length, {}
            for output in document.get("outputs", []):
                size = output.get("parameters", {}).get("binary_data_size")
                shape = [int(d) for d in output["shape"]]
                if size is None:  # the server chose JSON for this one
                    result[output["name"]] = _from_json(output, shape)
                    continue
                if offset + size > len(body):
                    raise ValueError("the answer is shorter than its header says")
                result[output["name"]] = _from_bytes(output["datatype"], body[offset:offset + size], shape)
                offset += size
        except (ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
            raise RemoteError(f"{self.url}: not a Triton (KServe v2) answer for model {model} ({exc}); "
                              "is the url Triton's HTTP port?") from None
        return result

    def _http(self, request):
        """(body, headers); the headers keep their case-insensitive lookup (proxies lowercase them)."""
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(MAX_RESPONSE_BYTES), response.headers
        except urllib.error.HTTPError as exc:
            raise RemoteError(f"{self.url}: {_server_message(exc)}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"{self.url}: cannot reach the server ({reason}); is `stmae-edge serve` running?") from None
        except http.client.HTTPException as exc:
            raise RemoteError(f"{self.url}: the answer is not HTTP ({type(exc).__name__}); is this Triton's HTTP "
                              "port (8000 by default; gRPC is grpc://HOST:8001)?") from None

    def _grpc_client(self, address: str):
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise BackendError("grpc:// needs tritonclient: install the serve extra, or use http://") from None
        return grpcclient.InferenceServerClient(address)

    def _infer_grpc(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        requests = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            requests.append(tensor)
        try:
            response = self._grpc.infer(model, requests, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                                        client_timeout=self.timeout)
        except InferenceServerException as exc:
            raise RemoteError(f"{self.url}: {exc.message()}") from None
        return {name: response.as_numpy(name) for name in outputs if response.as_numpy(name) is not None}

    def _metadata_document(self) -> dict:
        """From the NAME_metadata model of `stmae-edge serve`, else the config parameter of triton-repo."""
        try:
            answer = self.infer(self.model + p.METADATA_SUFFIX, {p.METADATA_REQUEST: np.zeros((1, 1), np.int32)},
                                [p.METADATA])
            self._outputs = [p.SCORE, p.ANOMALY_MAP, p.ERROR]
            return json.loads(answer[p.METADATA].reshape(-1)[0])
        except RemoteError as first:
            if self._grpc is None and first.status is None:  # no answer at all: nothing to fall back on
                raise
            config = self._model_config()
            if config is None:
                raise RemoteError(f"{self.url}: no model {self.model!r} there (`stmae-edge serve` prints the names "
                                  f"it serves): {first}") from None
            value = config.get("parameters", {}).get(p.METADATA_PARAMETER, {}).get("string_value")
            if not value:
                raise RemoteError(f"{self.url}: model {self.model} has no stmae-edge metadata; serve it with "
                                  "`stmae-edge serve` or write its repository with `stmae-edge triton-repo`") from None
            return json.loads(value)

    def _model_config(self) -> dict | None:
        if self._grpc is not None:
            from tritonclient.utils import InferenceServerException

            try:
                return self._grpc.get_model_config(self.model, as_json=True).get("config", {})
            except InferenceServerException:
                return None
        try:
            body, _ = self._http(urllib.request.Request(f"{self.url}/v2/models/{self.model}/config"))
        except RemoteError:
            return None
        return json.loads(body)


def _from_bytes(datatype: str, raw: bytes, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        items, position = [], 0
        while position < len(raw):
            (length,) = struct.unpack_from("<I", raw, position)
            items.append(raw[position + 4:position + 4 + length])
            position += 4 + length
        return np.array(items, dtype=object).reshape(shape)
    if datatype not in DATATYPES:
        raise RemoteError(f"the server answered with datatype {datatype}, which this client does not read")
    return np.frombuffer(raw, dtype=DATATYPES[datatype]).reshape(shape)


def _from_json(output: dict, shape: list[int]) -> np.ndarray:
    if output["datatype"] == "BYTES":
        return np.array([str(x).encode() for x in output["data"]], dtype=object).reshape(shape)
    return np.asarray(output["data"], dtype=DATATYPES.get(output["datatype"], np.float32)).reshape(shape)


def _server_message(exc: urllib.error.HTTPError) -> str:
    """Triton's own error text ({"error": "..."}), on one line."""
    try:
        text = json.loads(exc.read(65536)).get("error", "")
    except (ValueError, OSError, AttributeError):
        text = ""
    text = (text or f"HTTP {exc.code} {exc.reason}").splitlines()[0].split(". NOTE:")[0]
    return text.removeprefix("[request id: <id_unknown>] ")[:500]
