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


def amplify_error(error: np.ndarray | None) -> tuple[np.ndarray | None, float]:
    """Stretch a uint8 |prediction - actual| map so its largest difference is white; returns (image, gain)."""
    if error is None:
        return None, 1.0
    peak = int(error.max())
    gain = 255.0 / peak if peak > 0 else 1.0
    return np.clip(error.astype(np.float32) * gain, 0, 255).astype(np.uint8), gain


def panel_grid(panels: list[np.ndarray] | np.ndarray, columns: int, gap: int = 6) -> np.ndarray:
    """Equal-sized uint8 panels (h, w, 3) in reading order, ``columns`` to a row, white gaps between
    them; blank cells of the last row stay white.

    Returns:
        uint8 (rows * (h + gap) - gap, columns * (w + gap) - gap, 3).
    """
    h, w, _ = panels[0].shape
    rows = -(-len(panels) // columns)  # ceil
    cells = np.full((rows * columns, h + gap, w + gap, 3), 255, np.uint8)  # (cells, h+g, w+g, 3)
    cells[: len(panels), :h, :w] = np.stack(panels)
    grid = cells.reshape(rows, columns, h + gap, w + gap, 3).transpose(0, 2, 1, 3, 4)  # (rows, h+g, cols, w+g, 3)
    return np.ascontiguousarray(grid.reshape(rows * (h + gap), columns * (w + gap), 3)[:-gap, :-gap])
