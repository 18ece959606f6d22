"""A run's history of pictures, bounded in count and bytes, for browsing a run after the fact."""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass

import numpy as np

from config import AppConfig


@dataclass(frozen=True)
class Snapshot:
    """What the page showed at one iteration: frame t, the predicted frame t+1 and the error map of
    the prediction frame t was compared with (uint8 (H, W, 3) or None), and that iteration's metrics."""

    iteration: int
    current: np.ndarray | None
    predicted: np.ndarray | None
    error: np.ndarray | None
    error_mse: float | None
    metrics: dict


class RunSnapshots:
    """A run history's pictures, bounded: at most ``max_snapshots`` snapshots and ``max_bytes`` bytes.

    Frames are kept zlib-compressed (lossless; a black frame with one dot is a few kB). When either
    bound is reached every other snapshot is dropped and from then on only every ``stride``-th
    iteration is kept (the stride doubles each time), so what is kept stays evenly spread over the
    whole history, first iteration included.
    """

    def __init__(self, max_snapshots: int = AppConfig.history_snapshots, max_bytes: int = AppConfig.history_bytes):
        if max_snapshots < 2 or max_bytes < 1:
            raise ValueError("a run history keeps at least 2 snapshots and 1 byte")
        self.max_snapshots, self.max_bytes = int(max_snapshots), int(max_bytes)
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._items: list[tuple[int, tuple, dict]] = []  # (iteration, packed pictures, metrics)
            self._bytes, self.stride, self._first = 0, 1, None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def iterations(self) -> list[int]:
        """The iterations kept, oldest first."""
        with self._lock:
            return [item[0] for item in self._items]

    def wants(self, iteration: int) -> bool:
        """Whether ``add`` would keep this iteration (so a caller builds the pictures only then)."""
        return self._first is None or (int(iteration) - self._first) % self.stride == 0

    def add(self, metrics: dict, views: dict) -> bool:
        """Keep iteration ``metrics['iteration']`` (views as ``get_prediction_views``) when it falls on the
        stride; returns whether it was kept."""
        iteration = int(metrics["iteration"])
        with self._lock:
            if self._first is None:
                self._first = iteration
            if (iteration - self._first) % self.stride:
                return False
            packed = tuple(pack(views.get(key)) for key in ("current", "predicted", "error"))
            self._items.append((iteration, packed + (views.get("error_mse"),), dict(metrics)))
            self._bytes += sum(len(p[0]) for p in packed if p is not None)
            while len(self._items) > 1 and (len(self._items) > self.max_snapshots or self._bytes > self.max_bytes):
                self._thin()
            return True

    def _thin(self) -> None:
        """Drop every other snapshot (the first stays) and double the stride; call under the lock."""
        self._items = [item for item in self._items if (item[0] - self._first) % (2 * self.stride) == 0]
        self._bytes = sum(len(p[0]) for item in self._items for p in item[1][:3] if p is not None)
        self.stride *= 2

    def nearest(self, iteration: int) -> Snapshot | None:
        """The kept snapshot whose iteration is nearest (the earlier one on a tie); None when empty."""
        with self._lock:
            if not self._items:
                return None
            kept = np.array([item[0] for item in self._items])  # (n,) ascending
            it, packed, metrics = self._items[int(np.argmin(np.abs(kept - iteration)))]
        current, predicted, error = (unpack(p) for p in packed[:3])
        return Snapshot(it, current, predicted, error, packed[3], metrics)


def pack(image: np.ndarray | None) -> tuple[bytes, tuple, str] | None:
    """An image as (zlib-compressed bytes, shape, dtype), losslessly; None stays None."""
    if image is None:
        return None
    image = np.ascontiguousarray(image)
    return zlib.compress(image.tobytes(), 1), image.shape, image.dtype.str


def unpack(packed: tuple[bytes, tuple, str] | None) -> np.ndarray | None:
    """The image ``pack`` packed, as a new writable array; None stays None."""
    if packed is None:
        return None
    data, shape, dtype = packed
    return np.frombuffer(zlib.decompress(data), dtype=np.dtype(dtype)).reshape(shape).copy()
