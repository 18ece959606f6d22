"""Frame and dot metrics of uint8 frames (numpy only).

``frame_mse`` compares pixels on the 0-1 scale; the dot metrics find the white dot's centre on the
torus (a circular mean per axis), measure how far a predicted dot is from the true one and how often
the latest predictions put it within ``WITHIN_PX`` (the "dot found" share).
"""

from __future__ import annotations

import math

import numpy as np

WITHIN_PX = 3.0  # a predicted dot this close (in pixels) to the true one counts as found


def frame_mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two uint8 frames on the 0-1 scale."""
    return float(np.mean((a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0) ** 2))


def frame_mses(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``frame_mse`` of each pair of a batch: uint8 (B, H, W, 3) twice -> float64 (B,)."""
    diff = a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0  # (B, H, W, 3)
    return np.mean(diff.reshape(len(diff), -1) ** 2, axis=1, dtype=np.float64)  # (B,)


def dot_centroids(frames: np.ndarray, threshold: int = 127) -> np.ndarray:
    """Centre (x, y) of the bright pixels of each frame on the torus; NaN where a frame has none.

    A circular mean per axis, so a dot split across an edge is found where it is, not in the middle.

    Args:
        frames: uint8 (B, H, W, 3).

    Returns:
        float64 (B, 2).
    """
    bright = frames.astype(np.float32).mean(-1) > threshold  # (B, H, W)
    B, H, W = bright.shape
    count = bright.sum(axis=(1, 2)).astype(np.float64)  # (B,)
    per_x, per_y = bright.sum(axis=1), bright.sum(axis=2)  # (B, W), (B, H) bright pixels per column / row
    ax, ay = np.arange(W) * (2 * np.pi / W), np.arange(H) * (2 * np.pi / H)  # (W,), (H,)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.arctan2(per_x @ np.sin(ax) / count, per_x @ np.cos(ax) / count) * W / (2 * np.pi) % W  # (B,)
        y = np.arctan2(per_y @ np.sin(ay) / count, per_y @ np.cos(ay) / count) * H / (2 * np.pi) % H  # (B,)
    centres = np.stack([x, y], axis=1)  # (B, 2)
    centres[count == 0] = np.nan
    return centres


def dot_errors(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``dot_error`` of each pair of a batch: uint8 (B, H, W, 3) twice -> float64 (B,), inf where a
    prediction has no dot, NaN where the actual frame has none."""
    guess, truth = dot_centroids(predicted), dot_centroids(actual)  # (B, 2) each
    H, W = actual.shape[1:3]
    d = np.abs(guess - truth)  # (B, 2) |dx|, |dy|
    d = np.minimum(d, np.array([W, H]) - d)  # the short way round the torus
    errors = np.hypot(d[:, 0], d[:, 1])  # (B,)
    errors[np.isnan(guess[:, 0])] = np.inf
    errors[np.isnan(truth[:, 0])] = np.nan
    return errors


def dot_centroid(frame: np.ndarray, threshold: int = 127) -> tuple[float, float] | None:
    """``dot_centroids`` of one uint8 (H, W, 3) frame: (x, y), or None when it has no bright pixel."""
    x, y = dot_centroids(frame[None], threshold)[0]
    return None if math.isnan(x) else (float(x), float(y))


def dot_error(predicted: np.ndarray, actual: np.ndarray) -> float | None:
    """Toroidal distance in pixels between the dots of two frames; inf when the prediction has no
    dot, None when the actual frame has none."""
    error = float(dot_errors(predicted[None], actual[None])[0])
    return None if math.isnan(error) else error


def dot_found_shares(errors: np.ndarray, window: int) -> np.ndarray:
    """Per scored prediction, the share (0-1) of the last ``window`` predictions whose dot landed within
    ``WITHIN_PX`` of the true one (no predicted dot, inf, counts as a miss): the moment the model finds the dot.

    Args:
        errors: float (n,) the dot errors of the scored predictions, in order.

    Returns:
        float64 (n,) the rolling share after each of them.
    """
    hit = np.asarray(errors, dtype=np.float64) <= WITHIN_PX  # (n,) inf compares False
    csum = np.concatenate([[0.0], np.cumsum(hit)])  # (n+1,)
    n = np.arange(1, len(hit) + 1)
    return (csum[n] - csum[np.maximum(n - window, 0)]) / np.minimum(n, window)  # (n,) rolling mean


def latest_dot_hits(history: list[dict], window: int) -> tuple[int, int] | None:
    """(hits, scored): of the latest ``window`` scored predictions of a metric history, how many put the
    dot within ``WITHIN_PX`` of the true one, and how many there are (fewer than ``window`` early on);
    None before any."""
    errors = []
    for r in reversed(history):  # only the latest ``window`` scored rows are read
        if r.get("dot_error") is not None:
            errors.append(r["dot_error"])
            if len(errors) == window:
                break
    if not errors:
        return None
    return int(np.count_nonzero(np.asarray(errors, dtype=np.float64) <= WITHIN_PX)), len(errors)


def latest_dot_found_share(history: list[dict], window: int) -> float | None:
    """``dot_found_shares`` after the latest scored prediction of a metric history (None before any)."""
    hits = latest_dot_hits(history, window)
    return None if hits is None else hits[0] / hits[1]
