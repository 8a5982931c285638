"""A Detector whose network runs on a Triton Inference Server: the same Detections as in-process.

    detector = RemoteDetector("http://inspection-server:8000", "model")    # or "grpc://host:8001"
    results = detector.predict(["part1.png", frame])                       # list of Detections

    images ──> load_image + the model's Preprocessing (here, the one definition) ──> (N, 3, H, W)
           ──> server: NAME (stmae-edge serve) or NAME from a triton-repo repository
           ──> maps and scores, checked as the in-process Detector checks its backend's (shapes, NaN)
           ──> postprocess (here, as the in-process Detector) ──> Detections

HTTP needs nothing beyond numpy: KServe v2 with Triton's binary tensor extension over urllib. gRPC
uses tritonclient (the serve extra). The model's metadata comes from the server: the NAME_metadata
model of `stmae-edge serve`, or the config parameter that `stmae-edge triton-repo` writes. Whatever the
server answers is read as untrusted: a missing or malformed part is a RemoteError that names it.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import struct
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np

from .. import wire_format as wire
from ..checks import is_whole, parse_document
from ..errors import BackendError, ConfigError, RemoteError
from .detector import ImageScorer, accepted_sizes, check_input_batch, check_network_outputs, trained_on_colour

logger = logging.getLogger(__name__)

DATATYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "BOOL": np.bool_, "UINT8": np.uint8,
             "UINT16": np.uint16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64}
MAX_RESPONSE_BYTES = 1 << 31


class RemoteDetector(ImageScorer):
    """A served model, used as the in-process Detector is (see the module docstring).

    Attributes:
        metadata: the model's ModelMetadata, as the server gives it.
        preprocessing: how images become the network's input (done here, in the caller's process).
        thresholds: raw-score thresholds used when a call does not override them (the server's;
            assignable, for this client only).
        batch_size: most images per request, after the cap by the server's max batch.
        min_region_area: smaller regions, in image pixels, are not reported.
    """

    def __init__(self, url: str, model: str, *, timeout: float = 60.0, min_region_area: int = 1,
                 batch_size: int | None = None, check_size: bool = True):
        """Connect to a served model and read its metadata.

        Args:
            url: http://HOST:PORT (Triton's HTTP endpoint; https:// and a path where a reverse proxy
                serves it, https://HOST/PATH) or grpc://HOST:PORT.
            model: the served model's name (`stmae-edge serve` prints it).
            timeout: seconds per request (more than 0).
            min_region_area: smaller regions, in image pixels, are not reported.
            batch_size: most images per request (default and cap: the server's max batch).
            check_size: refuse images far from the sizes the model was trained on, as Detector does.

        Raises:
            ConfigError: a malformed url or model name, a timeout that is not a positive number, or a
                batch_size or min_region_area that is not a whole number (at least 1 and 0).
            RemoteError: the server or model is not there, or its metadata document is missing or
                malformed (naming the part).
        """
        self.model = wire.check_model_name(model)
        if not isinstance(url, str):
            raise ConfigError(f"server url {url!r}: give http(s)://HOST:PORT[/PATH] or grpc://HOST:PORT as a string")
        scheme, _, address = url.partition("://")
        host, _, path = address.partition("/")
        # https and a path: a reverse proxy in front of the server (README, "Serving"); gRPC has no path
        if scheme not in ("http", "https", "grpc") or not host or (scheme == "grpc" and path.strip("/")):
            raise ConfigError(f"server url {url!r}: give http(s)://HOST:PORT[/PATH] or grpc://HOST:PORT")
        if batch_size is not None and (not is_whole(batch_size) or batch_size < 1):
            raise ConfigError(f"batch_size {batch_size!r} must be a whole number, at least 1 (or None: the server's "
                              "max batch)")
        if not is_whole(min_region_area) or min_region_area < 0:
            raise ConfigError(f"min_region_area {min_region_area!r} must be a whole number, at least 0")
        if not isinstance(check_size, bool):
            raise ConfigError(f"check_size {check_size!r} must be True or False")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ConfigError(f"timeout {timeout!r} must be a number of seconds above 0")
        self.url, self.protocol, self.timeout = url.rstrip("/"), scheme, float(timeout)
        self.min_region_area = min_region_area
        self._grpc = self._grpc_client(host) if scheme == "grpc" else None
        self.closed = False  # close() was called
        self._outputs = [wire.SCORE, wire.ANOMALY_MAP]  # and ERROR from a `stmae-edge serve` server
        self.metadata, self.thresholds, self.max_batch, self._runtime = wire.read_metadata_document(
            self._metadata_document(), f"{self.url}: the metadata document of model {self.model}")
        self.preprocessing = self.metadata.preprocessing
        self.score_stats = self.metadata.score_stats
        self.map_stats = self.metadata.region_stats
        self.sizes_accepted = accepted_sizes(self.metadata, check_size)
        self._gray_news = trained_on_colour(self.metadata)
        self.batch_size = self.max_batch if batch_size is None else min(int(batch_size), self.max_batch)
        if batch_size is not None and batch_size > self.max_batch:  # the caller asked for more than they get
            logger.warning("batch_size %d exceeds the max batch of model %s on %s (%d); requests of at most %d images",
                           batch_size, self.model, self.url, self.max_batch, self.batch_size)
        self.model_path = f"{self.url}/v2/models/{self.model}"

    @property
    def info(self) -> dict:
        """What answers: the server, the model, and the runtime the server reported."""
        return {"backend": f"triton ({self.protocol})", "device": f"{self.url} ({self._runtime.get('device', 'server')})",
                "model": self.model, "server_runtime": self._runtime}

    # -- the Detector API: predict, raw_maps and preprocess come from ImageScorer --------------
    def run_tensors(self, batch: np.ndarray, offset: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images (N, 3, H, W) float32 -> maps (N, H, W) and raw scores (N,), from the server,
        checked as Detector.run_tensors checks its backend's (check_network_outputs).

        Args:
            offset: the index of batch[0] in the caller's call, or of each image (where the call left some
                out), so that an error names the image there.

        Raises:
            ConfigError: the batch is not float32 (N, 3, H, W) at the model's input size, 1 <= N <= its
                max batch, as Detector.run_tensors takes it. BackendError: the detector was closed.
            RemoteError: the server refused the request or an image (naming it), or answered maps or
                scores that are missing, of the wrong shape, or NaN or infinite (a `triton-repo` model
                has no error output: its network's NaN arrives as a score).
        """
        if self.closed:
            raise BackendError(f"this RemoteDetector for {self.url} was closed; create a new one")
        check_input_batch(batch, self.preprocessing.input_size, self.max_batch)
        count = len(batch)
        outputs = self.infer(self.model, {wire.IMAGES: batch}, self._outputs)
        errors = outputs.get(wire.ERROR)  # from `stmae-edge serve`: why an image was not scored (its outputs are 0)
        if errors is not None:
            for i, message in enumerate(errors.reshape(-1)):
                if message:
                    text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
                    text = " ".join(text.split())[:300]  # a server's text: one line, whatever it sent
                    raise RemoteError(f"image {offset + i if isinstance(offset, int) else offset[i]}: {text}")
        where = f"{self.url}, model {self.model}: "
        missing = [name for name in (wire.ANOMALY_MAP, wire.SCORE) if name not in outputs]
        if missing:
            raise RemoteError(f"{where}the answer has no {' or '.join(missing)} output; is this a model that "
                              "`stmae-edge serve` or `stmae-edge triton-repo` made?")
        maps, scores = outputs[wire.ANOMALY_MAP], outputs[wire.SCORE]
        # a triton-repo model answers (N, 1, H, W) and both answer scores (N, 1): drop those axes only,
        # so that any other shape reaches the check below as it came
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        try:  # copied: the wire's arrays are read-only views
            maps, scores = np.array(maps, dtype=np.float32), np.array(scores, dtype=np.float32)
        except (ValueError, TypeError):
            raise RemoteError(f"{where}the answer's maps ({maps.dtype}) or scores ({scores.dtype}) are not "
                              "numbers; is this a model that `stmae-edge serve` or `stmae-edge triton-repo` made?"
                              ) from None
        check_network_outputs(maps, scores, count, self.preprocessing.input_size, where=where, error=RemoteError)
        return maps, scores

    def close(self) -> None:
        """Close the gRPC channel (HTTP keeps no connection open between requests); later calls raise
        BackendError, as a closed Detector's do. Closing twice is fine."""
        if self._grpc is not None and not self.closed:
            self._grpc.close()
        self.closed = True

    def __enter__(self) -> RemoteDetector:
        """The detector itself, closed when the block ends.

        Raises:
            BackendError: it was closed already.
        """
        if self.closed:
            raise BackendError(f"this RemoteDetector for {self.url} was closed; create a new one")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the wire ---------------------------------------------------------------------------------
    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One inference request: named arrays in, named arrays out (BYTES as object arrays of bytes).

        Args:
            model: the served model's name (NAME, NAME_frames, NAME_gray or NAME_metadata).
            inputs: the request's tensors by name, each with its batch dimension first.
            outputs: the names of the tensors to return.

        Raises:
            RemoteError: the server cannot be reached, refused the request (with its status and
                message), or answered something that is not a well-formed inference response.
        """
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
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, struct.error) as exc:
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
        """From the NAME_metadata model of `stmae-edge serve`, else the config parameter of triton-repo.

        Raises:
            RemoteError: no answer, no such model, no metadata, or metadata that is not a JSON object.
        """
        try:
            answer = self.infer(self.model + wire.METADATA_SUFFIX, {wire.METADATA_REQUEST: np.zeros((1, 1), np.int32)},
                                [wire.METADATA])
        except RemoteError as first:
            if self._grpc is None and first.status is None:  # no answer at all: nothing to fall back on
                raise
            return self._document_from_config(first)
        self._outputs = [wire.SCORE, wire.ANOMALY_MAP, wire.ERROR]
        what = f"{self.url}: the metadata that model {self.model + wire.METADATA_SUFFIX} answered"
        values = answer.get(wire.METADATA)
        text = values.reshape(-1)[0] if values is not None and values.size else None
        if not isinstance(text, (bytes, str)):
            raise RemoteError(f"{what} has no {wire.METADATA!r} text; is the server `stmae-edge serve`?")
        return parse_document(text, what, RemoteError)

    def _document_from_config(self, first: RemoteError) -> dict:
        """The document in the model config's METADATA_PARAMETER, as `stmae-edge triton-repo` writes it;
        `first`: why the NAME_metadata model did not answer."""
        config = self._model_config()
        if config is None:
            raise RemoteError(f"{self.url}: no model {self.model!r} there (`stmae-edge serve` prints the names "
                              f"it serves): {first}") from None
        parameters = config.get("parameters") if isinstance(config, dict) else None
        entry = parameters.get(wire.METADATA_PARAMETER) if isinstance(parameters, dict) else None
        value = entry.get("string_value") if isinstance(entry, dict) else None
        if not value or not isinstance(value, str):
            raise RemoteError(f"{self.url}: model {self.model} has no stmae-edge metadata; serve it with "
                              "`stmae-edge serve` or write its repository with `stmae-edge triton-repo`") from None
        return parse_document(value, f"{self.url}: the {wire.METADATA_PARAMETER} parameter of model {self.model}",
                              RemoteError)

    def _model_config(self) -> dict | None:
        """The model's configuration as JSON, or None where the server has no such model.

        Raises:
            RemoteError: the server answered something that is not a JSON object.
        """
        if self._grpc is not None:
            from tritonclient.utils import InferenceServerException

            try:
                return self._grpc.get_model_config(self.model, as_json=True).get("config", {})
            except InferenceServerException:
                return None
        try:
            body, _ = self._http(urllib.request.Request(f"{self.url}/v2/models/{self.model}/config"))
        except RemoteError as exc:
            if exc.status in (400, 404):  # Triton's answers for a model it does not know
                return None
            raise  # a server that failed, or went away: that, not "no such model"
        return parse_document(body, f"{self.url}: the config of model {self.model}", RemoteError)


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
    datatype = output["datatype"]
    if datatype == "BYTES":
        return np.array([str(x).encode() for x in output["data"]], dtype=object).reshape(shape)
    if datatype not in DATATYPES:  # as the binary reply's reader says, not read as float32 without a word
        raise RemoteError(f"the server answered with datatype {datatype}, which this client does not read")
    return np.asarray(output["data"], dtype=DATATYPES[datatype]).reshape(shape)


def _server_message(exc: urllib.error.HTTPError) -> str:
    """Triton's own error text ({"error": "..."}), on one line."""
    try:
        text = json.loads(exc.read(65536)).get("error", "")
    except (ValueError, OSError, AttributeError):
        text = ""
    text = (text or f"HTTP {exc.code} {exc.reason}").splitlines()[0].split(". NOTE:")[0]
    return text.removeprefix("[request id: <id_unknown>] ")[:500]
