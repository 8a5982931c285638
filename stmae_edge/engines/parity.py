"""How closely an exported graph must reproduce its PyTorch model: one definition for export's check on
random inputs, `verify` on real images and the GPU acceptance script. numpy only.
"""

from __future__ import annotations

import numpy as np

# The largest relative difference (maximum over maps and scores) an exported graph may show against its
# PyTorch model on real images (`verify`), by the graph's precision. At export, on random inputs, an fp32
# graph is held to its tolerance and an fp16 one only to finite outputs: half precision's error on noise
# says little about images (a tiny model with intensity normalisation: 0.28 on noise, 0.018 on images).
PARITY_RTOL = {"fp32": 1e-4, "fp16": 2e-2}


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """What PARITY_RTOL bounds, for one output: the largest absolute difference, relative to the largest
    reference value (so a map near zero somewhere does not blow the figure up)."""
    return float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12)
