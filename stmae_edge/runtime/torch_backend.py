"""The PyTorch checkpoint as a runtime backend, for comparison only (`bench --engine model.pt`).

It needs the train extra (torch), so the runtime never imports it; `runtime.backends.open_backend`
loads it only for .pt files. Same interface, same preprocessing and postprocessing: a benchmark
against it measures the inference engines, nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..errors import BackendError, first_line
from ..metadata import MAX_BATCH
from .devices import cpu_description


class TorchBackend:
    min_batch, max_batch = 1, MAX_BATCH
    precision = "fp32"

    def __init__(self, path: Path | str, device: str = "cpu"):
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("PyTorch sees no CUDA GPU here; use --backend torch-cpu")
        self.name = f"torch-{device}"
        self.model, self.metadata = load_model(path)
        self.model.to(device)
        self._device = torch.device(device)
        self.provider = f"PyTorch {torch.__version__} eager"
        self.device = f"GPU: {torch.cuda.get_device_name()}" if device == "cuda" else cpu_description()

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.model is None:
            raise BackendError("this PyTorch backend was closed; create a new Detector")
        try:
            maps, scores = self.model(torch.from_numpy(batch).to(self._device))
        except RuntimeError as exc:  # out of memory, a failed CUDA kernel, ...
            raise BackendError(f"PyTorch failed: {first_line(exc)}") from exc
        return maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()

    def close(self) -> None:
        self.model = None
