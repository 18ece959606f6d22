"""TensorBoard logs of world-model runs: every loop iteration's numbers and, every few iterations,
the prediction pictures, one run folder per browser tab or trainer run.

A ``TensorBoardLog`` is a ``RunController.iteration_hook``: the controller calls it in the run's
thread after recording each iteration. It writes with ``torch.utils.tensorboard`` (whose writer
thread does the file work), loaded only when a log is made, so logging that is off costs nothing.
Run folders are named by their start time in UTC (``20261205-014502.123Z-tab``), so a listing
sorts them by time, and are created owner-only (0700), as is the log folder when it is made here.

    tensorboard --logdir DIR
"""

from __future__ import annotations

import logging
import math
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from config import LOGGER_NAME, AppConfig
from frame_metrics import latest_dot_found_share
from images import amplify_error

if TYPE_CHECKING:
    from run_controller import RunController

LOG = logging.getLogger(f"{LOGGER_NAME}.engine")

# metric key of an iteration -> TensorBoard tag (grouped into sections by the part before "/")
SCALAR_TAGS = {
    "prediction_error": "error/prediction_mse",
    "copy_error": "error/copy_last_frame_mse",
    "dot_error": "dot/error_px",  # skipped when no dot was predicted (inf); the found share counts it a miss
    "training_loss": "train/loss",
    "training_mse": "train/masked_mse",
    "lr": "train/learning_rate",
    "grad_norm": "train/gradient_norm",
    "iteration_time": "time/iteration_s",
}
DOT_FOUND_TAG = "dot/found_share"  # share (0-1) of the latest predictions within 3 px of the true dot
IMAGE_TAGS = {
    "current": "prediction/1_current_frame",
    "predicted": "prediction/2_predicted_next_frame",
    "error": "prediction/3_error_map",  # |prediction - frame t|, stretched so the largest difference is white
}


def new_run_folder(root: str | Path, label: str) -> Path:
    """Create ``root`` (0700 when made here) and a fresh, owner-only run folder in it named
    ``<UTC start time>-<label>``; the label is reduced to letters, digits, ``-`` and ``_``."""
    root = Path(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S.%f")[:-3] + "Z"
    base = f"{stamp}-{re.sub(r'[^A-Za-z0-9_-]+', '_', label)[:40]}"
    for n in range(1000):  # two tabs in the same millisecond get -1, -2, ...
        folder = root / (base if n == 0 else f"{base}-{n}")
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free run folder name for {base}")


class TensorBoardLog:
    """Logs a controller's loop iterations to a run folder of its own under ``root``.

    The folder and writer are made at the first iteration (or by ``open``), so a tab that never
    runs leaves no folder. Scalars, at the model's iteration number: the ``SCALAR_TAGS`` of every
    iteration and the dot-found share over the latest ``dot_window`` predictions; every
    ``images_every`` iterations the current frame, the predicted next frame and the error map.
    A log that cannot be written (a full disk) stops with one warning; the run goes on.

    Args:
        root: the log folder (``tensorboard --logdir root`` shows every run in it).
        label: ends the run folder's name ("tab", the session trained on).
        images_every: iterations between pictures (0: none).
        flush_s: logged values reach the disk at least this often.
        dot_window: predictions in the dot-found share.
    """

    def __init__(self, root: str | Path, label: str, images_every: int = AppConfig.tensorboard_images_every,
                 flush_s: float = AppConfig.tensorboard_flush_s, dot_window: int = AppConfig.dot_window):
        self.root, self.label = Path(root), label
        self.images_every, self.flush_s, self.dot_window = images_every, flush_s, dot_window
        self.folder: Path | None = None  # the run folder, once made
        self._writer = None
        self._lock = threading.Lock()  # the run's thread logs, the tab's release closes
        self._closed = self._failed = False

    def open(self) -> Path:
        """Make the run folder and its writer now (the first iteration does it otherwise); returns the folder.

        Raises:
            OSError: the folder cannot be made.
        """
        with self._lock:
            return self._open()

    def _open(self) -> Path:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # loaded only when logging is on

            self.folder = new_run_folder(self.root, self.label)
            self._writer = SummaryWriter(str(self.folder), flush_secs=self.flush_s)
        return self.folder

    def __call__(self, controller: RunController, metrics: dict) -> None:
        """Log one iteration (the controller's ``iteration_hook``)."""
        with self._lock:
            if self._closed or self._failed:
                return
            try:
                self._log(controller, metrics)
            except OSError as e:
                self._failed = True
                LOG.warning("TensorBoard logging stopped, the run goes on: %s", e)

    def _log(self, controller: RunController, metrics: dict) -> None:
        self._open()
        writer, step = self._writer, metrics["iteration"]
        for key, tag in SCALAR_TAGS.items():
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                writer.add_scalar(tag, value, step)
        if metrics.get("dot_error") is not None:
            writer.add_scalar(DOT_FOUND_TAG, latest_dot_found_share(controller.history, self.dot_window), step)
        if self.images_every and step % self.images_every == 0:
            views = controller.prediction_views(canvas=False) or {}
            pictures = {"current": views.get("current"), "predicted": views.get("predicted"),
                        "error": amplify_error(views.get("error"))[0]}
            for key, image in pictures.items():
                if image is not None:
                    writer.add_image(IMAGE_TAGS[key], image, step, dataformats="HWC")  # uint8 (H, W, 3)

    def close(self) -> None:
        """Write what is pending and close the run's log; later iterations log nothing."""
        with self._lock:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
