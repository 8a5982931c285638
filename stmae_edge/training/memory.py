"""How much memory ST-MAE training will need at its peak, said before the backbone pass starts.

    the features kept for every good image (backbone and score-head features, fp16; a probe of one image)
      x PEAK_PER_KEPT + PEAK_BASE_BYTES                      (measured, docs/BENCHMARKS.md)
    against what this machine, or the container it runs in, has available

Running out of memory ends training in one line (cli.py), but only after the backbone pass and the
transformer's minutes; a folder too large for the machine is better said before either.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import MIN_GOOD_IMAGES

logger = logging.getLogger(__name__)

# Peak resident memory of the default preset grew by 1.64 MB per good image for 0.54 MB of features
# kept, from 2.6 GB (640 and 1,280 images: 3.61 and 4.66 GB; BENCHMARKS "Training memory on large folders")
PEAK_PER_KEPT = 3.05
PEAK_BASE_BYTES = 2.6e9
GB = 1e9


@torch.no_grad()
def kept_bytes_per_image(model, input_size: tuple[int, int]) -> int:
    """The bytes of features training keeps for each image: one image's through the frozen backbone."""
    features, score_features = model.extract_with_score(torch.zeros(1, 3, *input_size))
    return 2 * (features.numel() + (score_features.numel() if score_features is not None else 0))  # fp16


def peak_bytes(images: int, kept_per_image: int) -> float:
    """Estimated peak resident memory of training on `images` feature sets of `kept_per_image` bytes."""
    return PEAK_BASE_BYTES + PEAK_PER_KEPT * kept_per_image * images


def available_bytes() -> int | None:
    """Memory this process can still take: the system's MemAvailable, or less where a container's limit
    (cgroup v2 or v1) leaves less; None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for folder, limit_name, usage_name, cache_key in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        try:
            limit, usage = (Path(folder, name).read_text().strip() for name in (limit_name, usage_name))
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:  # "max", or v1's "no limit"
            # usage counts the page cache, which the kernel gives back: reading the images just filled it
            found.append(max(0, int(limit) - int(usage) + _cgroup_stat(Path(folder, "memory.stat"), cache_key)))
    return min(found) if found else None


def _cgroup_stat(stat_file: Path, key: str) -> int:
    """One counter of a cgroup's memory.stat (0 where it cannot be read)."""
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def warn_if_short(images: int, feature_sets: int, kept_per_set: int) -> None:
    """A warning where the estimated peak exceeds the memory available, with the --max-images that fits.
    `feature_sets`: what is kept for the `images` good images (more than one each with crops or
    corrupted copies)."""
    have = available_bytes()
    need = peak_bytes(feature_sets, kept_per_set)
    if have is None or need <= have:
        return
    sets_per_image = feature_sets / max(images, 1)
    fits = int((have - PEAK_BASE_BYTES) / (PEAK_PER_KEPT * kept_per_set * sets_per_image))
    fewer = f"train on fewer (--max-images {fits}) or" if fits >= MIN_GOOD_IMAGES else "train"
    what = f"{images} images" + (f" ({feature_sets} feature sets: crops or corrupted copies)" if feature_sets != images
                                 else "")
    logger.warning("training on %s needs about %.1f GB of memory at its peak and %.1f GB is available: it is "
                   "likely to run out after the backbone pass; %s on a machine with more memory", what, need / GB,
                   have / GB, fewer)
