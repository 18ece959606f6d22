"""Concat World Model Explorer, shared by every page section: per-tab state, input checks, formatting, layout.

- ``UserState`` (what one browser tab owns) and the ``TabRegistry`` that frees a closed tab's model;
- refusals (``refusal``: one log line, no traceback) and the input checks every handler and its
  validator run first (``validated``);
- small picture and text helpers (2x frames, amplified error maps, numbers, paths hidden from messages);
- the image and graph blocks every section's layout is made of.

Imports no other page module.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import math
import numbers
import os
import re
import secrets
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
import numpy as np
import pandas as pd
from gradio.data_classes import ImageData
from PIL import Image

import config
import validation
from atomic_files import write_atomic
from attention_viz import VIZ_LINES
from checkpoints import RefusedFiles
from model_pool import ModelPool
from private_files import PrivateFolder
from record_session import RecordingGate
from run_controller import RunController
from config import AppConfig, AutoencoderConcatPredictorWorldModelConfig
from images import amplify_error, enlarge  # noqa: F401 (amplify_error: the sections import it from here)
from session_explorer_lib import Session, SessionError, load_session as load_session_from_disk, resolve_session_dir
from tensorboard_log import TensorBoardLog

# -----------------------------------------------------------------------------
# constants

APP = AppConfig()
MODEL_CFG = AutoencoderConcatPredictorWorldModelConfig()
FRAME_UPSCALE = 2  # single frames are shown at 2x (nearest neighbour) so a 16 px patch is easy to see
LABEL_HEIGHT = 40  # an image's label line above it (the page's CSS keeps labels off the pictures)
# display heights in CSS pixels: a 2x frame (448 px) and a canvas (224 px) at their own size under their label
CANVAS_HEIGHT, FRAME_HEIGHT, ATTENTION_HEIGHT = 224 + LABEL_HEIGHT, 448 + LABEL_HEIGHT, 480
X_LABEL_ANGLE = -40  # degrees: slanted x tick labels never run into each other, even 5-digit ones on a narrow graph
PLOT_HEIGHT = 280  # a metric graph's height in CSS pixels (one more every other update: see graph_updates)
UNKNOWN_SESSION = "Unknown session: that name is not a session folder in the sessions folder. Press Refresh sessions and choose one from the list."
NO_SESSION = "Load a session first: choose one in the list and press Load session."
LOG = logging.getLogger(config.LOGGER_NAME)


# -----------------------------------------------------------------------------
# per-tab state


class UserState:
    """What one browser tab (or API client) owns: a run controller, plus the attention controls only
    the page needs.

    A plain class, not a dataclass: Gradio serialises dataclass values with ``dataclasses.asdict``.
    Gradio deep-copies a ``gr.State`` default for every new tab; ``__deepcopy__`` hands out a fresh
    object with a new controller from the same pool (models and locks are never shared between tabs).
    """

    def __init__(self, pool: ModelPool | None = None, config: AutoencoderConcatPredictorWorldModelConfig = MODEL_CFG,
                 refused_files: RefusedFiles | None = None, tensorboard_dir: str | None = None,
                 recordings: RecordingGate | None = None, exports: PrivateFolder | None = None,
                 threads: int | None = None):
        self.pool = pool
        self.refused_files = refused_files if refused_files is not None else RefusedFiles()  # shared by the tabs
        self.tensorboard_dir = tensorboard_dir  # each tab logs its runs to a run folder of its own here (None: off)
        self.recordings = recordings if recordings is not None else RecordingGate(  # shared by the tabs
            APP.max_recordings, APP.record_budget_bytes)
        self.exports = exports if exports is not None else export_folder()  # shared by the tabs
        self.controller = RunController(
            config=config, refused_files=self.refused_files, pool=pool,
            run_lock_wait_s=APP.run_lock_wait_s, stop_grace_s=APP.stop_grace_s,
            history_snapshots=APP.history_snapshots, history_bytes=APP.history_bytes, threads=threads)
        if tensorboard_dir:  # the folder is made at the tab's first run
            self.controller.iteration_hook = TensorBoardLog(tensorboard_dir, "tab", APP.tensorboard_images_every,
                                                            APP.tensorboard_flush_s, APP.dot_window)
        layers, heads = tuple(range(config.decoder_depth)), tuple(range(config.decoder_num_heads))
        self.attention_controls = (APP.default_quantile, layers, heads, "mean", VIZ_LINES)
        self.selected_patch: tuple[int, int] | None = None  # (row, col) whose attention section 6 shows
        self.graph_redraws = 0  # graph updates sent to this tab (see graph_updates)
        self.export_note = ""  # what the tab's latest export holds and lacks (page_workflow.export_note)

    def __deepcopy__(self, memo) -> UserState:
        return UserState(self.pool, self.controller.config, self.refused_files, self.tensorboard_dir, self.recordings,
                         self.exports, self.controller.threads)


def export_folder() -> PrivateFolder:
    """The private folder exports are written in (``cwm-exports-*``, 0700, inside the system temp folder)."""
    return PrivateFolder("cwm-exports-", "the system temp folder ($TMPDIR) for exports")


def release_user(user: UserState | None) -> None:
    """Stop the tab's run and its recording and drop its model (the ``gr.State`` delete callback; never blocks)."""
    if not isinstance(user, UserState):
        return
    if user.recordings.stop(user):
        LOG.info("stopped the recording of a closed tab (the frames recorded so far are kept)")
    c = user.controller
    if c.has_model:
        name = c.session.name if c.session is not None else "no session"
        LOG.info("freed the world model of a closed tab (%d iterations run, last session: %s)", len(c.history), name)
    c.release()
    if isinstance(c.iteration_hook, TensorBoardLog):
        c.iteration_hook.close()


class TabRegistry:
    """Maps open browser tabs to their ``UserState`` so ``demo.unload`` can free a closed tab's model
    at once instead of an hour later (when Gradio deletes the state of a closed session), and stops
    the recordings of any closed connection (an API client's too: Gradio keeps the state of a client
    that never received it, and calls no delete callback for it)."""

    def __init__(self, recordings: RecordingGate | None = None) -> None:
        self._users: weakref.WeakValueDictionary[str, UserState] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self.recordings = recordings

    def register(self, user: UserState, request: gr.Request) -> UserState:
        """Page-load handler: remember this tab's state (and hand it back so Gradio tracks it)."""
        if request is not None and request.session_hash:
            with self._lock:
                self._users[request.session_hash] = user
        return user

    def release(self, request: gr.Request) -> None:
        """Unload handler: the tab (or API client) closed: stop its recordings and free its model now."""
        if request is None or not request.session_hash:
            return
        if self.recordings is not None and self.recordings.stop_session(request.session_hash):
            LOG.info("stopped the recording of a closed connection (the frames recorded so far are kept)")
        with self._lock:
            user = self._users.pop(request.session_hash, None)
        release_user(user)


# -----------------------------------------------------------------------------
# refusals and input checks (each raises a refusal naming the problem; nothing changes before they pass)


def refusal(message: str) -> gr.Error:
    """The error that refuses a request a person or client can correct (bad input, nothing to act on
    yet, a run in the way): the page and the API client get ``message``, the terminal one log line
    (no traceback: it is no fault of the server)."""
    LOG.info("refused: %s", message)
    return gr.Error(message, print_exception=False)


def validated(*checks: Callable[[], Any] | None) -> list[dict]:
    """A validator's answer (the ``validator=`` of an event): one ``gr.validate`` per input, in order.

    ``checks[i]`` runs the handler's own check of input i (raising a refusal), None where there is
    nothing to check (the tab's state). Gradio runs the validator before it queues the event: a
    refusal leaves every output as it was (no "Error" badges over them), the page shows the message
    under that input, and an API client gets it as a validation error (HTTP 422). The handler runs
    the same checks again (for a state that changed in between, and for callers without Gradio)."""
    answers = []
    for check in checks:
        try:
            if check is not None:
                check()
            answers.append(gr.validate(True, ""))
        except gr.Error as e:
            answers.append(gr.validate(False, e.message))
    return answers


def _shown(value: Any) -> str:
    return repr(value)[:40]


def whole_number(value: Any, what: str, low: int, high: int) -> int:
    """Return ``value`` as an int in ``[low, high]``; otherwise raise ``gr.Error`` naming ``what``.

    The rule and its message are ``validation.whole_number``'s (ints and integral floats pass, since
    a slider sends 12.0; bools, None, strings, NaN, infinities, fractions and out-of-range values do not).
    """
    try:
        return validation.whole_number(value, what, low, high)
    except ValueError as e:
        raise refusal(str(e)) from None


def parse_quantile(value: Any) -> float:
    """Return the attention quantile as a float in [0, 100]; otherwise raise ``gr.Error``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise refusal(f"Quantile must be a number from 0 to 100 (got {_shown(value)}).")
    if not 0.0 <= float(value) <= 100.0:
        raise refusal(f"Quantile must be a number from 0 to 100 (got {float(value):g}).")
    return float(value)


def selected_indices(flags: Sequence[Any], what: str) -> tuple[int, ...]:
    """Indices of the ticked checkboxes; a value that is not true/false raises ``gr.Error``."""
    for i, flag in enumerate(flags):
        if not isinstance(flag, (bool, np.bool_)):
            raise refusal(f"{what} {i} checkbox must be true or false (got {_shown(flag)}).")
    return tuple(i for i, flag in enumerate(flags) if flag)


def choice(value: Any, options: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``options``; otherwise raise ``gr.Error`` listing them."""
    if not isinstance(value, str) or value not in options:
        raise refusal(f"{what} must be one of: {', '.join(options)} (got {_shown(value)}).")
    return value


def require_session(user: UserState) -> Session:
    if user.controller.session is None:
        raise refusal(NO_SESSION)
    return user.controller.session


# -----------------------------------------------------------------------------
# pictures, text and graph data


def upscale(image: np.ndarray | None, factor: int = FRAME_UPSCALE) -> np.ndarray | None:
    """A frame for the page, enlarged ``factor`` times by nearest neighbour (``images.enlarge``); None stays None."""
    if image is None or factor == 1:
        return image
    return enlarge(image, factor)  # (H*f, W*f, 3)


def format_value(value: float | None, digits: int = 5) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def code_span(text: Any) -> str:
    """``text`` as markdown inline code: shown literally (markdown escapes would show as backslashes
    inside it), backticks replaced so the span cannot end early."""
    return "`" + str(text).replace("`", "'") + "`"


def display_path(path: Path) -> str:
    """A path for the page: relative to the project, else with the data folder's location hidden."""
    try:
        return str(Path(path).resolve().relative_to(config.PROJECT_ROOT))
    except ValueError:
        return hide_paths(path)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.<>~:/-])/[^\s'\"<>|,;:)]+")  # what is left of a server path after the folders


def hide_paths(text: Any) -> str:
    """``text`` with the server's folders replaced by short names (for messages that quote an error from
    the operating system, which may hold an absolute path): the data and project folders and the system
    temp folder (where the app's private folders live by default); any other absolute path left (a
    park folder or Gradio cache set elsewhere) becomes ``<path>``."""
    text = str(text)
    folders = [(config.SESSIONS_ROOT, "<sessions>"), (config.CHECKPOINT_DIR, "<checkpoints>"),
               (config.SAVED_ROOT, "<saved>"), (config.PROJECT_ROOT, "<project>"), (tempfile.gettempdir(), "<temp>")]
    forms = []
    for folder, shown in folders:
        forms.extend((form, shown) for form in {str(Path(folder)), str(Path(folder).resolve())})
    for form, shown in sorted(forms, key=lambda pair: len(pair[0]), reverse=True):
        if len(form) > 1:  # never "/" alone
            text = text.replace(form, shown)
    return _ABSOLUTE_PATH.sub("<path>", text)


def os_error_text(error: OSError) -> str:
    """An operating-system error as a sentence fragment for the page: what went wrong (its ``strerror``)
    and the file's folder as a placeholder, never the server's path."""
    what = error.strerror or type(error).__name__
    if error.errno == errno.ENAMETOOLONG:
        what = "the name is too long for the file system"
    elif error.errno == errno.ENOSPC:
        what = "the disk is full"
    where = hide_paths(error.filename) if error.filename else ""
    return f"{what}" + (f" ({where})" if where else "")


def series_anchors(colours: dict[str, str]) -> pd.DataFrame:
    """One empty (null) row per series name. Gradio's LinePlot fixes the colour domain from the data it
    first draws, so without these a series that appears later would be drawn without a colour
    (invisible); Vega skips the null rows."""
    return pd.DataFrame({"iteration": [np.nan] * len(colours), "value": [np.nan] * len(colours),
                         "series": list(colours)})


def graph_updates(user: UserState, frames: Sequence[pd.DataFrame], height: int = PLOT_HEIGHT) -> tuple[dict, ...]:
    """Updates that show new data in graphs and make the browser lay each graph out again.

    Gradio's Vega view fits its axes (label widths, titles, legend) to the data it is first drawn
    with and keeps that layout when only the data changes: a graph first drawn empty then clips its
    y labels and drops its axis titles. A change of its size lays it out again, so every other
    update of a tab's graphs is one pixel taller."""
    user.graph_redraws += 1
    return tuple(gr.update(value=frame, height=height + user.graph_redraws % 2) for frame in frames)


def format_px(value: float | None) -> str:
    """A dot error for the page: pixels, 'no dot drawn' for a prediction without one, '-' before any."""
    if value is None:
        return "-"
    return "no dot drawn" if not math.isfinite(value) else f"{value:.1f} px"


# -----------------------------------------------------------------------------
# sessions


def session_folder(session_choice: Any) -> Path:
    """The folder of the session of that name in the sessions folder; a refusal naming the problem otherwise."""
    if session_choice is None or session_choice == "":
        raise refusal("Choose a session in the list first (press Refresh sessions if it is empty).")
    try:
        return resolve_session_dir(session_choice)
    except ValueError:
        raise refusal(UNKNOWN_SESSION) from None


def open_session(session_choice: Any) -> Session:
    """The session of that name from the sessions folder; a refusal naming the problem otherwise."""
    session_dir = session_folder(session_choice)
    try:
        return load_session_from_disk(session_dir)
    except SessionError as e:
        raise refusal(f"Cannot load session {session_choice}: {hide_paths(e)}") from None


# -----------------------------------------------------------------------------
# layout blocks


def written_once(block: gr.Image) -> gr.Image:
    """``block`` (a ``gr.Image``), its uint8 pictures from now on each written once, whole.

    ``gr.Image`` writes every picture it outputs again, in place (truncate, then write), under a name
    made from its PNG bytes. When an update carries a picture the page already shows (a frame that
    did not change, the same view in a second tab), a browser fetching that file at that moment gets
    it half-written: a broken picture, and "Too little data for declared Content-Length" with a
    traceback in the terminal. Here a picture's file appears under its final name only whole
    (``write_atomic``: a temp file renamed into place) and is never written again: a picture already
    in the cache is handed out as it is, without being encoded again (its time renewed, as Gradio does
    for its copies, since ``delete_cache`` ages files by ctime). Anything else (None, a path, a float
    array) goes to Gradio's own ``postprocess``. The block keeps its class (a subclass of a Gradio
    component makes Gradio write a ``.pyi`` copy of its module beside it): only this instance's
    ``postprocess`` is replaced.
    """
    salt = secrets.token_bytes(16)  # file names nobody can work out from a picture they know
    gradio_postprocess = block.postprocess

    def postprocess(value: Any) -> ImageData | None:
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
            return ImageData(path=str(png_once(value, Path(block.GRADIO_CACHE), salt)), orig_name="image.png")
        return gradio_postprocess(value)

    block.postprocess = postprocess
    return block


def png_once(picture: np.ndarray, cache: Path, salt: bytes) -> Path:
    """The PNG file of ``picture`` (uint8, (H, W) or (H, W, C)) in ``cache``: written atomically the
    first time, its time renewed afterwards. The name hashes the pixels, their shape and ``salt``."""
    key = hashlib.blake2b(repr(picture.shape).encode(), key=salt, digest_size=20)
    key.update(np.ascontiguousarray(picture).data)
    path = cache / f"picture-{key.hexdigest()}" / "image.png"
    try:
        os.utime(path)
        return path
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    write_atomic(path, png.getvalue(), fsync=False)  # a cache: whole or absent, no need to survive a power cut
    return path


def image_block(label: str, elem_id: str, height: int, **kwargs) -> gr.Image:
    # a fixed height keeps the block from collapsing while its (lazy-loaded) picture is off screen
    return written_once(gr.Image(label=label, elem_id=elem_id, height=height, format="png", type="numpy",
                                 interactive=False, elem_classes=["pixelated"], buttons=["download", "fullscreen"],
                                 **kwargs))


def line_plot(label: str, elem_id: str, y_title: str, colours: dict[str, str], y_lim: list[float] | None = None,
              x_title: str = "iteration") -> gr.LinePlot:
    """A metric graph: long-format data (iteration, value, series), one colour per series name.

    Gradio sizes the Vega view to the whole block: a block label or a legend would push the axes out
    of sight, so the title lives inside the view and the colours are named under the graphs. No
    ``x_lim``, here or in an update (see ``page_outputs.span_point``)."""
    return gr.LinePlot(series_anchors(colours), x="iteration", y="value", color="series", color_map=colours,
                       colors_in_legend=[], title=label, label=label, show_label=False,
                       elem_id=elem_id, x_title=x_title, y_title=y_title, height=PLOT_HEIGHT,
                       x_axis_format="d", x_label_angle=X_LABEL_ANGLE, y_lim=y_lim,  # "d": whole iterations, so Vega places no ticks between them
                       buttons=["fullscreen", "export"])
