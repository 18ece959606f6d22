"""Picture helpers shared by the app's pages and the attention drawings (numpy only, no gradio, no torch)."""

from __future__ import annotations

import numpy as np


def enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement: every pixel becomes a ``factor`` x ``factor`` block, so a 16 px patch or a
    5 px dot stays crisp (a resample would blur it).

    Args:
        image: (H, W, ...) array of any dtype (RGB pictures, alpha planes, colour-mapped matrices).
        factor: a whole number >= 1.

    Returns:
        a new (H * factor, W * factor, ...) array of the same dtype (a copy, also for factor 1).
    """
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)  # (H*f, W*f, ...)
