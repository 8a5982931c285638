"""A labelled dataset (MVTec AD layout) scored through the runtime, for `threshold` and `report`:
any model file the Detector opens (.onnx, .plan, or .pt with the train extra), in batches, with a
progress bar; maps at the model's input size, where masks are compared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import data
from ..model_files import file_kind_of
from ..preprocessing import declared_image_size
from ..progress import progress_bar
from ..scoring import map_maxima

logger = logging.getLogger(__name__)


@dataclass
class ScoredDataset:
    samples: list  # data.EvalSample, in eval_samples order
    scores: np.ndarray  # (N,) raw image scores
    maps: np.ndarray | None  # (N, H, W) float32 at the model's input size; None where only maxima were kept
    detector: object  # the runtime.Detector that scored them
    maxima: np.ndarray  # (N,) each image's map maximum

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])

    @property
    def good_scores(self) -> np.ndarray:
        return self.scores[self.labels == 0]

    @property
    def defect_scores(self) -> np.ndarray:
        return self.scores[self.labels == 1]

    @property
    def map_maxima(self) -> np.ndarray:
        """(N,) each image's map maximum: its score, unless the model has a score head."""
        return self.maxima


# What scores a labelled set unless a backend is named: the CPU backend of each kind of file (a plan on
# its GPU), so that evaluate, threshold and report give the same figures on any machine, and choose a
# threshold from the scores that evaluate reports.
EVALUATION_BACKENDS = {"checkpoint": "torch-cpu", "onnx": "ort-cpu", "plan": "tensorrt"}


def score_dataset(model: Path | str, data_dir: Path | str, backend: str | None = None, batch_size: int = 16,
                  description: str = "scoring", samples: list[data.EvalSample] | None = None,
                  masks: bool = True, bit_depth: int | None = None, keep_maps: bool = True) -> ScoredDataset:
    """Every image under DATA_DIR/test through a Detector (`samples`: data.eval_samples(data_dir), where
    the caller has read them already; `backend` None: EVALUATION_BACKENDS's for the file; `masks`: the
    caller reads the masks, which are then decoded first too; `bit_depth`: the Detector's, in place of
    the model's, as predict takes it; `keep_maps` False: each map's maximum only, for a caller that
    needs no more, such as `threshold`: 256 KB less per image at the default input size).

    Raises:
        DatasetError: no test images, or test images or masks that cannot be read (counted, the first
            named, before any is scored: the images first, then the masks); and the Detector's typed errors.
    """
    from ..runtime import Detector

    detector = Detector(model, backend or EVALUATION_BACKENDS[file_kind_of(model)], batch_size=batch_size,
                        bit_depth=bit_depth)
    if samples is None:
        samples = data.eval_samples(data_dir, both_classes=False)
    # Every image and mask decoded first: one that cannot be read stops the run here, counted and the
    # first named, not after minutes of scoring (a mask was read only once every image had been scored)
    images = data.survey([s.path for s in samples], "test images", digests=False)
    if masks:
        data.survey([s.mask_path for s in samples if s.mask_path is not None], "masks", digests=False)
    warn_about_sizes(detector.metadata.trained_sizes, samples, images.sizes)
    # Filled in place, batch by batch: a list joined at the end held every map twice at its peak
    count, (height, width) = len(samples), detector.preprocessing.input_size
    maps = np.empty((count, height, width), np.float32) if keep_maps else None
    scores, maxima = np.empty(count, np.float64), np.empty(count, np.float64)
    with progress_bar(f"{description} ({detector.info['backend']})", count) as advance:
        for start in range(0, count, batch_size):
            chunk = [s.path for s in samples[start:start + batch_size]]
            m, s = detector.raw_maps(chunk)
            stop = start + len(chunk)
            if maps is not None:
                maps[start:stop] = m
            scores[start:stop], maxima[start:stop] = s, map_maxima(m)
            advance(len(chunk))
    return ScoredDataset(samples, scores, maps, detector, maxima)


def warn_about_sizes(sizes, samples: list[data.EvalSample], shown: dict[Path, tuple[int, int]] | None = None) -> None:
    """Say how many test images `predict` would refuse as far from the training images' sizes: their
    scores still count here (the figures describe the set as given), but the line would not score them.
    `shown`: the images' (height, width), where the caller has read them already."""
    if sizes is None:
        return
    far = [s.path for s in samples
           if sizes.refusal(*(shown[s.path] if shown is not None else declared_image_size(s.path)))]
    if far:
        logger.warning("%d of %d test images are far from the sizes this model was trained on (%s; first: %s): "
                       "they are scored here, but `predict` refuses them on the line", len(far), len(samples),
                       sizes.describe(), far[0])
