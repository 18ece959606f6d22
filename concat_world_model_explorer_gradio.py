"""Concat World Model Explorer: the Gradio web app.

Load a recorded toroidal-dot session, scrub its frames, press Run and watch the canvas-inpainting
world model (``AutoencoderConcatPredictorWorldModel``) learn to predict the next frame, then ask
why it predicts what it does by exploring its decoder attention.

The file reads top to bottom (STYLE.md habits 9-11, the Gradio demos' layout):

1. per-browser-tab state (``UserState``) and the registry that frees a closed tab's model;
2. input checks and small picture/markdown helpers;
3. the event handlers, plain module-level functions that tests import and call;
4. ``build_demo()``, which only declares the layout and wires the handlers;
5. the command line (``main``); nothing launches on import.

Endpoints (``api_name``, tests and tools call them): ``/refresh_sessions``, ``/load_session``,
``/update_frame``, ``/jump_to_frame``, ``/run_world_model`` (a generator), ``/stop`` and
``/update_attention_viz``. Usage::

    python concat_world_model_explorer_gradio.py [--host 0.0.0.0] [--port 7860] [--share]
        [--auth USER:PASS] [--public] [--no-browser]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import numbers
import os
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
import numpy as np
import pandas as pd
import torch
from starlette.middleware import Middleware

import config
from attention_viz import AGGREGATIONS, VIZ_HEATMAP, VIZ_LINES, VIZ_TYPES, draw_attention
from autoencoder_concat_predictor_world_model import (
    ModelPool,
    RunBusyError,
    RunController,
    RunStatus,
    limit_malloc_arenas,
)
from config import AppConfig, AutoencoderConcatPredictorWorldModelConfig
from record_session import record_session
from server_guard import MAX_UPLOAD_BYTES, LoginDelay, LoginGuard, UploadRefusal, never_served_paths
from session_explorer_lib import (
    ACTION_NAMES,
    Session,
    SessionError,
    format_timestamp,
    load_session as load_session_from_disk,
    markdown_escape,
    resolve_session_dir,
    scan_sessions,
    session_info_markdown,
)

# -----------------------------------------------------------------------------
# constants

APP = AppConfig()
MODEL_CFG = AutoencoderConcatPredictorWorldModelConfig()
LAYER_COLOUR_NAMES = ("red", "gold", "green", "blue", "violet")  # attention_viz.LAYER_COLOURS in words
FRAME_UPSCALE = 2  # single frames are shown at 2x (nearest neighbour) so a 16 px patch is easy to see
MAX_PLOT_POINTS = 2000  # longer metric histories are thinned to this many points per series
MIN_ITERATION_SPAN = 10  # the iteration axis spans at least this many iterations, so its ticks are whole ones
CANVAS_HEIGHT, FRAME_HEIGHT, ATTENTION_HEIGHT = 260, 470, 480  # display heights in CSS pixels
UNKNOWN_SESSION = "Unknown session: that name is not a session folder in the sessions folder. Press Refresh sessions and choose one from the list."
NO_SESSION = "Load a session first: choose one in the list and press Load session."
NO_MODEL_YET = "_No model yet: it is created at the first Run (from the saved checkpoint when there is one)._"
NOTHING_RUN_YET = "_Nothing to show yet: run the world model once; its decoder attention is captured at the end of every run._"
LOG = logging.getLogger("concat_world_model_explorer")

CSS = """
.pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#app-title h1 { margin-bottom: 0; }
.section-title h2 { margin: 0.6em 0 0.1em 0; }
"""
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")

# the components every run update writes, in order (see _display_outputs)
RUN_OUTPUT_KEYS = (
    "progress", "checkpoint", "train_original", "train_masked", "train_inpainting", "train_composite",
    "pred_current", "pred_next", "pred_error", "prediction_info", "plot_error", "plot_time", "plot_loss",
    "plot_dot", "attn_image", "attn_stats", "frame_slider",
)


# -----------------------------------------------------------------------------
# per-tab state


class UserState:
    """What one browser tab (or API client) owns: a run controller, plus the attention controls only
    the page needs.

    A plain class, not a dataclass: Gradio serialises dataclass values with ``dataclasses.asdict``.
    Gradio deep-copies a ``gr.State`` default for every new tab; ``__deepcopy__`` hands out a fresh
    object with a new controller from the same pool (models and locks are never shared between tabs).
    """

    def __init__(self, pool: ModelPool | None = None, config: AutoencoderConcatPredictorWorldModelConfig = MODEL_CFG):
        self.pool = pool
        options = dict(config=config, run_lock_wait_s=APP.run_lock_wait_s, stop_grace_s=APP.stop_grace_s)
        self.controller = pool.controller(**options) if pool is not None else RunController(**options)
        layers, heads = tuple(range(config.decoder_depth)), tuple(range(config.decoder_num_heads))
        self.attention_controls = (APP.default_quantile, layers, heads, "mean", VIZ_LINES)

    def __deepcopy__(self, memo) -> UserState:
        return UserState(self.pool, self.controller.config)


def release_user(user: UserState | None) -> None:
    """Stop the tab's run and drop its model (the ``gr.State`` delete callback; never blocks)."""
    if not isinstance(user, UserState):
        return
    c = user.controller
    if c.has_model:
        name = c.session.name if c.session is not None else "no session"
        LOG.info("freed the world model of a closed tab (%d iterations run, last session: %s)", len(c.history), name)
    c.release()


class TabRegistry:
    """Maps open browser tabs to their ``UserState`` so ``demo.unload`` can free a closed tab's model
    at once instead of an hour later (when Gradio deletes the state of a closed session)."""

    def __init__(self) -> None:
        self._users: weakref.WeakValueDictionary[str, UserState] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def register(self, user: UserState, request: gr.Request) -> UserState:
        """Page-load handler: remember this tab's state (and hand it back so Gradio tracks it)."""
        if request is not None and request.session_hash:
            with self._lock:
                self._users[request.session_hash] = user
        return user

    def release(self, request: gr.Request) -> None:
        """Unload handler: the tab closed, free its model now."""
        if request is None or not request.session_hash:
            return
        with self._lock:
            user = self._users.pop(request.session_hash, None)
        release_user(user)


# -----------------------------------------------------------------------------
# input checks (each raises gr.Error naming the problem; nothing changes before they pass)


def _shown(value: Any) -> str:
    return repr(value)[:40]


def whole_number(value: Any, what: str, low: int, high: int) -> int:
    """Return ``value`` as an int in ``[low, high]``; otherwise raise ``gr.Error`` naming ``what``.

    Accepts ints and integral floats (a slider sends 12.0); refuses bools, None, strings, NaN,
    infinities, fractions and anything out of range.
    """
    rule = f"{what} must be a whole number from {low} to {high}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise gr.Error(f"{rule} (got {_shown(value)}).")
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise gr.Error(f"{rule} (got {_shown(value)}).")
    if not low <= int(number) <= high:
        raise gr.Error(f"{rule} (got {int(number)}).")
    return int(number)


def parse_quantile(value: Any) -> float:
    """Return the attention quantile as a float in [0, 100]; otherwise raise ``gr.Error``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise gr.Error(f"Quantile must be a number from 0 to 100 (got {_shown(value)}).")
    if not 0.0 <= float(value) <= 100.0:
        raise gr.Error(f"Quantile must be a number from 0 to 100 (got {float(value):g}).")
    return float(value)


def selected_indices(flags: Sequence[Any], what: str) -> tuple[int, ...]:
    """Indices of the ticked checkboxes; a value that is not true/false raises ``gr.Error``."""
    for i, flag in enumerate(flags):
        if not isinstance(flag, (bool, np.bool_)):
            raise gr.Error(f"{what} {i} checkbox must be true or false (got {_shown(flag)}).")
    return tuple(i for i, flag in enumerate(flags) if flag)


def choice(value: Any, options: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``options``; otherwise raise ``gr.Error`` listing them."""
    if not isinstance(value, str) or value not in options:
        raise gr.Error(f"{what} must be one of: {', '.join(options)} (got {_shown(value)}).")
    return value


def require_session(user: UserState) -> Session:
    if user.controller.session is None:
        raise gr.Error(NO_SESSION)
    return user.controller.session


# -----------------------------------------------------------------------------
# pictures and text


def upscale(image: np.ndarray | None, factor: int = FRAME_UPSCALE) -> np.ndarray | None:
    """Nearest-neighbour enlargement (np.repeat): crisp pixels, never a blurry resample."""
    if image is None or factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)  # (H*f, W*f, 3)


def amplify_error(error: np.ndarray | None) -> tuple[np.ndarray | None, float]:
    """Stretch an |prediction - actual| map so its largest difference is white; returns (image, gain)."""
    if error is None:
        return None, 1.0
    peak = int(error.max())
    gain = 255.0 / peak if peak > 0 else 1.0
    return np.clip(error.astype(np.float32) * gain, 0, 255).astype(np.uint8), gain


def _fmt(value: float | None, digits: int = 5) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _display_path(path: Path) -> str:
    """A path for the page: relative to the project, else with the data folder's location hidden."""
    try:
        return str(Path(path).resolve().relative_to(config.PROJECT_ROOT))
    except ValueError:
        return _hide_paths(path)


def _hide_paths(text: Any) -> str:
    """``text`` with the server's data and project folders replaced by short names (for messages
    that quote an error from the operating system, which may hold an absolute path)."""
    text = str(text)
    for folder, shown in ((config.SESSIONS_ROOT, "<sessions>"), (config.CHECKPOINT_DIR, "<checkpoints>"),
                          (config.SAVED_ROOT, "<saved>"), (config.PROJECT_ROOT, "<project>")):
        for form in sorted({str(Path(folder)), str(Path(folder).resolve())}, key=len, reverse=True):
            text = text.replace(form, shown)
    return text


def frame_markdown(session: Session, index: int) -> str:
    """Step, timestamp and the action taken after frame ``index``."""
    obs = session.observations[index]
    action = session.action_after(index)
    after = "none (the last frame)" if action is None else f"{action} = {ACTION_NAMES.get(action, '?')}"
    return (
        f"**Frame {index}** of 0-{session.num_frames - 1} | **Step:** {obs['step']} | "
        f"**Time:** {format_timestamp(obs['timestamp'])} | **Action after it:** {after}"
    )


def frame_outputs(session: Session, index: int) -> tuple[np.ndarray, str]:
    try:
        image = session.frame(index)
    except SessionError as e:
        raise gr.Error(f"Cannot show frame {index}: {_hide_paths(e)}") from None
    return upscale(image), frame_markdown(session, index)


def broken_sessions_markdown(summaries: list) -> str:
    broken = [s for s in summaries if not s.ok]
    if not summaries:
        root = _display_path(config.SESSIONS_ROOT)
        return f"No sessions in `{root}`. Record one: `python record_session.py --pattern alternate --steps 200`."
    if not broken:
        return ""
    lines = [f"**{len(broken)} session(s) cannot be loaded:**"]
    lines += [f"- {markdown_escape(s.name)}: {markdown_escape(s.reason)}" for s in broken]
    return "\n".join(lines)


def training_settings_markdown(cfg: AutoencoderConcatPredictorWorldModelConfig = MODEL_CFG) -> str:
    """The training settings in use, from ``config.py``."""
    h, w = cfg.canvas_size
    gate = (
        f"on (train until masked MSE < {cfg.canvas_inpainting_threshold:g}, at most {cfg.quality_gate_max_steps} steps)"
        if cfg.quality_gate else "off (one optimizer step per iteration)"
    )
    device = "CUDA" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return "\n".join([
        f"- **Canvas:** {h}x{w} px ({cfg.canvas_history_size} frames, {cfg.separator_width} px separators), "
        f"{cfg.patch_size} px patches, grid {cfg.grid_size[0]}x{cfg.grid_size[1]}; training masks {cfg.mask_ratio:.0%} of the last slot, prediction all of it",
        f"- **Model:** encoder {cfg.embed_dim} wide x {cfg.depth} blocks x {cfg.num_heads} heads; "
        f"decoder {cfg.decoder_embed_dim} wide x {cfg.decoder_depth} blocks x {cfg.decoder_num_heads} heads",
        f"- **Optimizer:** AdamW, learning rate {cfg.learning_rate:g}, warm-up {cfg.warmup_steps} steps, cosine decay "
        f"over {cfg.lr_decay_steps} steps to {cfg.min_lr:g}, weight decay {cfg.weight_decay:g}, gradient clip {cfg.grad_clip:g}",
        f"- **Loss:** masked patches only; dot-pixel (foreground) weight {cfg.foreground_weight:g}, "
        f"foreground threshold {cfg.foreground_threshold:g}",
        f"- **Quality gate:** {gate}",
        f"- **Device:** {device}",
    ])


def _series(rows: list[dict], key: str, label: str, scale: float = 1.0) -> pd.DataFrame:
    points = [(r["iteration"], r[key] * scale) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    if len(points) > MAX_PLOT_POINTS:  # thin evenly, always keeping the first and the latest point
        keep = np.unique(np.linspace(0, len(points) - 1, MAX_PLOT_POINTS).round().astype(int))
        points = [points[i] for i in keep]
    return pd.DataFrame({"iteration": np.array([p[0] for p in points], dtype=np.float64),
                         "value": np.array([p[1] for p in points], dtype=np.float64),
                         "series": [label] * len(points)})


SERIES_PREDICTION, SERIES_BASELINE = "model prediction", "baseline: repeat last frame"
SERIES_LOSS, SERIES_MSE = "training loss (weighted)", "masked-patch MSE"
ERROR_COLOURS = {SERIES_PREDICTION: "#4f46e5", SERIES_BASELINE: "#9ca3af"}
LOSS_COLOURS = {SERIES_LOSS: "#dc2626", SERIES_MSE: "#f59e0b"}


def series_anchors(colours: dict[str, str]) -> pd.DataFrame:
    """One empty (null) row per series name. Gradio's LinePlot fixes the colour domain from the data it
    first draws, so without these a series that appears later would be drawn without a colour
    (invisible); Vega skips the null rows."""
    return pd.DataFrame({"iteration": [np.nan] * len(colours), "value": [np.nan] * len(colours),
                         "series": list(colours)})


def dot_found_rows(history: list[dict], window: int) -> list[dict]:
    """Per scored prediction, the share (%) of the last ``window`` predictions whose dot landed within
    3 px of the true one (no predicted dot counts as a miss): the moment the model finds the dot."""
    scored = [r for r in history if r.get("dot_error") is not None]
    if not scored:
        return []
    hit = np.array([r["dot_error"] <= 3.0 for r in scored], dtype=np.float64)  # (n,) inf compares False
    csum = np.concatenate([[0.0], np.cumsum(hit)])  # (n+1,)
    n = np.arange(1, len(hit) + 1)
    share = 100.0 * (csum[n] - csum[np.maximum(n - window, 0)]) / np.minimum(n, window)  # (n,) rolling mean
    return [{"iteration": r["iteration"], "within_3px_share": float(v)} for r, v in zip(scored, share)]


def metric_frames(history: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Long-format DataFrames for the four graphs: prediction error, iteration time, training loss and
    the rolling share of predictions that put the dot within 3 px."""
    error = pd.concat([series_anchors(ERROR_COLOURS), _series(history, "prediction_error", SERIES_PREDICTION),
                       _series(history, "copy_error", SERIES_BASELINE)], ignore_index=True)
    timing = _series(history, "iteration_time", "iteration time", scale=1000.0)
    loss = pd.concat([series_anchors(LOSS_COLOURS), _series(history, "training_loss", SERIES_LOSS),
                      _series(history, "training_mse", SERIES_MSE)], ignore_index=True)
    dot = _series(dot_found_rows(history, APP.dot_window), "within_3px_share", "within 3 px")
    return error, timing, loss, dot


def plot_updates(history: list[dict]) -> tuple[dict, ...]:
    """The four graphs, their iteration axis at least ``MIN_ITERATION_SPAN`` wide: a shorter one gets
    ticks between whole iterations (Gradio exposes no tick step), labelled 1, 2, 2 by the "d" format."""
    first = history[0]["iteration"] if history else 1
    last = history[-1]["iteration"] if history else 1
    span = [first, max(last, first + MIN_ITERATION_SPAN - 1)]
    return tuple(gr.update(value=frame, x_lim=span) for frame in metric_frames(history))


def _px(value: float | None) -> str:
    """A dot error for the page: pixels, 'no dot drawn' for a prediction without one, '-' before any."""
    if value is None:
        return "-"
    return "no dot drawn" if not math.isfinite(value) else f"{value:.1f} px"


# -----------------------------------------------------------------------------
# what a run shows


def checkpoint_markdown(c: RunController) -> str:
    """Which checkpoint the tab's model came from and where it was last saved."""
    origin, saved = c.origin, c.saved
    if origin is None:
        return NO_MODEL_YET
    shown = f"`{_display_path(origin.path)}`"
    if origin.kind == "loaded":
        parts = [f"**Checkpoint:** loaded {shown} at step {origin.step} (iteration {origin.iteration})."]
    elif origin.kind == "refused":
        parts = [f"**Checkpoint refused:** {markdown_escape(_hide_paths(origin.reason))}. Training a fresh model "
                 "instead; the refused file is kept beside it under a new name when this model first saves."]
    else:
        parts = [f"**Checkpoint:** none found at {shown}; training a fresh model."]
    if saved is not None and saved.ok:
        text = f"**Saved** to `{_display_path(saved.path)}` after the last run: step {saved.step}, iteration {saved.iteration}."
        if saved.set_aside:
            text += f" The refused file was kept as `{markdown_escape(saved.set_aside)}`."
        elif saved.reason:
            text += f" ({markdown_escape(saved.reason)}.)"
        parts.append(text)
    elif saved is not None:
        parts.append(f"**Checkpoint not saved:** {markdown_escape(_hide_paths(saved.reason))}")
    return "\n\n".join(parts)


def progress_markdown(status: RunStatus) -> str:
    """Progress k/N with the latest prediction error, iteration time and loss, and the model's counters."""
    if status.state == "idle":
        return "_Not run yet._"
    last = status.last
    state = {"running": "Running", "stopped": "Stopped", "done": "Done"}[status.state]
    time_ms = None if last.get("iteration_time") is None else 1000.0 * last["iteration_time"]
    step = "n/a" if status.model_step is None else status.model_step
    iteration = "n/a" if status.model_iteration is None else status.model_iteration
    text = (
        f"**{state}: {status.done}/{status.total}** iterations | "
        f"**prediction error (MSE):** {_fmt(last.get('prediction_error'))} | "
        f"**dot error:** {_px(last.get('dot_error'))} | "
        f"**iteration time:** {_fmt(time_ms, 4)} ms | **training loss:** {_fmt(last.get('training_loss'))} | "
        f"model step {step}, iteration {iteration}"
    )
    if status.problem and status.state != "running":
        text += f"\n\n**Run stopped early:** {markdown_escape(_hide_paths(status.problem))}"
    return text


def prediction_outputs(views: dict | None) -> tuple:
    """Current frame, predicted next frame, amplified error map (with its label) and a summary."""
    views = views or {"current": None, "predicted": None, "error": None, "error_mse": None}
    error, gain = amplify_error(views["error"])
    mse = views["error_mse"]
    label = f"Prediction error |predicted - actual| (MSE {_fmt(mse)}; brightness x{gain:.1f} for visibility)"
    info = (
        f"**Prediction error of the current frame (MSE):** {_fmt(mse)}. The error map compares the prediction "
        f"made one iteration earlier with the frame that then arrived; it is amplified x{gain:.1f} so faint "
        "differences show. _Predicted next frame_ is the model's guess for the frame after the current one."
    )
    return upscale(views["current"]), upscale(views["predicted"]), gr.update(value=upscale(error), label=label), info


def attention_outputs(user: UserState) -> tuple[np.ndarray | None, str]:
    """Redraw the cached attention capture with the tab's current controls (never runs the model)."""
    c = user.controller
    attention = c.attention
    if attention is None:
        return None, NOTHING_RUN_YET
    quantile, layers, heads, aggregation, viz_type = user.attention_controls
    if not layers:
        return None, "_Select at least one decoder layer to show attention._"
    if not heads:
        return None, "_Select at least one attention head to show attention._"
    try:
        image, _, summary = draw_attention(attention, quantile, layers, heads, aggregation, viz_type)
    except ValueError as e:
        raise gr.Error(f"Cannot draw the attention: {e}") from None
    iteration, step = c.attention_at
    return image, f"_Decoder attention captured after iteration {iteration} (model step {step})._\n\n{summary}"


def _display_outputs(user: UserState, final: bool, first: bool = False) -> tuple:
    """Values for RUN_OUTPUT_KEYS; while running, the slow-changing outputs are skipped."""
    c = user.controller
    progress = progress_markdown(c.status())
    if not c.has_model:
        return (progress, checkpoint_markdown(c)) + (gr.skip(),) * (len(RUN_OUTPUT_KEYS) - 2)
    train = c.training_views() or {}
    views = tuple(train.get(k) for k in ("original", "masked", "inpainting", "composite"))
    plots = plot_updates(c.history)
    tail = (*attention_outputs(user), gr.Slider(value=c.start_frame)) if final else (gr.skip(),) * 3
    checkpoint = checkpoint_markdown(c) if final or first else gr.skip()
    return (progress, checkpoint, *views, *prediction_outputs(c.prediction_views()), *plots, *tail)


# -----------------------------------------------------------------------------
# handlers


def refresh_sessions() -> tuple[gr.Dropdown, str]:
    """Scan the sessions folder: loadable sessions go in the list, broken ones are listed with the reason."""
    summaries = scan_sessions()
    names = [s.name for s in summaries if s.ok]
    return gr.Dropdown(choices=names, value=names[0] if names else None), broken_sessions_markdown(summaries)


def load_session(session_choice: Any, user: UserState) -> tuple:
    """Load a session by name; the tab's model (if any) is kept and replays it at the next Run."""
    if session_choice is None or session_choice == "":
        raise gr.Error("Choose a session in the list first (press Refresh sessions if it is empty).")
    try:
        session_dir = resolve_session_dir(session_choice)
    except ValueError:
        raise gr.Error(UNKNOWN_SESSION) from None
    try:
        session = load_session_from_disk(session_dir)
    except SessionError as e:
        raise gr.Error(f"Cannot load session {session_choice}: {_hide_paths(e)}") from None
    image, frame_md = frame_outputs(session, 0)
    user.controller.load_session(session)
    info = session_info_markdown(session)
    if user.controller.has_model:
        info += "\n\n_The world model is kept: the next Run replays this session from the slider's frame._"
    slider = gr.Slider(minimum=0, maximum=session.num_frames - 1, value=0, step=1, interactive=True)
    return user, info, slider, image, frame_md, 0


def update_frame(frame_index: Any, user: UserState) -> tuple[np.ndarray, str, int]:
    """Show frame ``frame_index`` (the slider) with its step, timestamp and following action; the
    next Run starts there (also when the slider moves during a run)."""
    session = require_session(user)
    index = whole_number(frame_index, "Frame index", 0, session.num_frames - 1)
    image, frame_md = frame_outputs(session, index)
    user.controller.set_start_frame(index)
    return image, frame_md, index


def jump_to_frame(frame_number: Any, user: UserState) -> tuple:
    """Jump straight to a frame number; moves the slider too."""
    session = require_session(user)
    index = whole_number(frame_number, "Frame number", 0, session.num_frames - 1)
    image, frame_md = frame_outputs(session, index)
    user.controller.set_start_frame(index)
    return gr.Slider(value=index), image, frame_md


def run_world_model(num_iterations: Any, user: UserState):
    """Train for ``num_iterations`` (1-500) on the loaded session, streaming progress a few times a second.

    A frame that cannot be read (changed on disk after the session was loaded) ends the run: the
    iterations done so far are kept and saved, and the run fails with a message naming the frame.
    """
    total = whole_number(num_iterations, "Number of iterations", APP.min_iterations, APP.max_iterations)
    require_session(user)
    last_yield = -math.inf
    try:
        for metrics in user.controller.run(total):
            if metrics is None or time.monotonic() - last_yield >= APP.update_interval_s:
                yield (user, *_display_outputs(user, final=False, first=metrics is None))
                last_yield = time.monotonic()
    except RunBusyError:
        raise gr.Error("A run is already in progress in this tab: press Stop or wait for it to finish.") from None
    yield (user, *_display_outputs(user, final=True))
    status = user.controller.status()
    if status.problem:
        raise gr.Error(f"The run stopped after {status.done} of {total} iterations: {_hide_paths(status.problem)}.")


def stop_run(user: UserState) -> tuple:
    """Ask the tab's run to stop after its current iteration, wait for it, then show the final state."""
    answer = user.controller.stop(APP.stop_wait_s)
    if answer == "stopping":
        return ("**Stopping:** the run ends after its current iteration.",) + (gr.skip(),) * (len(RUN_OUTPUT_KEYS) - 1)
    if answer == "idle" and not user.controller.has_model:
        return ("_Nothing is running._",) + (gr.skip(),) * (len(RUN_OUTPUT_KEYS) - 1)
    return _display_outputs(user, final=True)


def update_attention_viz(quantile: Any, *controls: Any) -> tuple[np.ndarray | None, str]:
    """Redraw the decoder attention from the capture of the last run with new controls.

    ``controls``: one checkbox per decoder layer, one per head (as many as the model has), the
    aggregation, the visualization type and the tab's ``UserState`` last.
    """
    *controls, user = controls
    cfg = user.controller.config
    n_layers, n_heads = cfg.decoder_depth, cfg.decoder_num_heads
    if len(controls) != n_layers + n_heads + 2:
        raise gr.Error(f"Expected {n_layers} layer and {n_heads} head checkboxes, the aggregation and the "
                       f"visualization type (got {len(controls)} values).")
    q = parse_quantile(quantile)
    layers = selected_indices(controls[:n_layers], "Decoder layer")
    heads = selected_indices(controls[n_layers:n_layers + n_heads], "Attention head")
    aggregation = choice(controls[-2], AGGREGATIONS, "Aggregation")
    viz_type = choice(controls[-1], VIZ_TYPES, "Visualization type")
    user.attention_controls = (q, layers, heads, aggregation, viz_type)
    return attention_outputs(user)


# -----------------------------------------------------------------------------
# layout


def _image(label: str, elem_id: str, height: int, **kwargs) -> gr.Image:
    # a fixed height keeps the block from collapsing while its (lazy-loaded) picture is off screen
    return gr.Image(label=label, elem_id=elem_id, height=height, format="png", type="numpy", interactive=False,
                    elem_classes=["pixelated"], buttons=["download", "fullscreen"], **kwargs)


def _plot(label: str, elem_id: str, y_title: str, colours: dict[str, str] | None = None,
          y_lim: list[float] | None = None) -> gr.LinePlot:
    # Gradio sizes the Vega view to the whole block: a block label or a legend would push the axes
    # out of sight, so the title lives inside the view and the colours are named under the graphs
    if colours:
        empty = series_anchors(colours)
    else:
        empty = pd.DataFrame({"iteration": pd.Series(dtype="float64"), "value": pd.Series(dtype="float64")})
    return gr.LinePlot(empty, x="iteration", y="value", color="series" if colours else None, color_map=colours,
                       colors_in_legend=[] if colours else None, title=label, label=label, show_label=False,
                       elem_id=elem_id, x_title="iteration", y_title=y_title, height=280,
                       x_axis_format="d", y_lim=y_lim,  # "d": whole iterations, so Vega places no ticks between them
                       buttons=["fullscreen", "export"])


def _session_section() -> dict[str, Any]:
    """Section 1: choose and load a session, scrub its frames."""
    gr.Markdown("## 1. Session and frames", elem_classes=["section-title"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                session_dropdown = gr.Dropdown(label="Session", choices=[], allow_custom_value=True,
                                               elem_id="session-dropdown", scale=3)
                refresh_btn = gr.Button("↻ Refresh sessions", elem_id="refresh-btn", scale=1)
                load_btn = gr.Button("Load session", variant="primary", elem_id="load-btn", scale=1)
            broken_md = gr.Markdown(elem_id="broken-sessions")
            session_info = gr.Markdown("_No session loaded._", elem_id="session-info")
        with gr.Column(scale=1):
            frame_image = _image("Frame (shown at 2x)", "frame-image", 470)
            frame_slider = gr.Slider(0, 1, value=0, step=1, label="Frame (the next Run starts its replay here)",
                                     elem_id="frame-slider", interactive=False)
            with gr.Row():
                jump_number = gr.Number(value=0, precision=0, label="Frame number", elem_id="jump-number", scale=2)
                jump_btn = gr.Button("Jump to frame", elem_id="jump-btn", scale=1)
            frame_info = gr.Markdown(elem_id="frame-info")
    return {"session_dropdown": session_dropdown, "refresh_btn": refresh_btn, "load_btn": load_btn, "broken_md": broken_md, "session_info": session_info, "frame_image": frame_image, "frame_slider": frame_slider, "jump_number": jump_number, "jump_btn": jump_btn, "frame_info": frame_info}


def _run_section() -> dict[str, Any]:
    """Section 2: iterations, Run and Stop, progress and checkpoint status."""
    gr.Markdown("## 2. Run the world model", elem_classes=["section-title"])
    with gr.Row():
        iterations = gr.Number(value=APP.default_iterations, precision=0, elem_id="iterations",
                               label=f"Iterations ({APP.min_iterations}-{APP.max_iterations})", scale=1)
        run_btn = gr.Button("▶ Run world model", variant="primary", elem_id="run-btn", scale=1)
        stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop-btn", scale=1)
    progress = gr.Markdown("_Not run yet._", elem_id="progress")
    checkpoint = gr.Markdown(NO_MODEL_YET, elem_id="checkpoint-info")
    with gr.Accordion("Training settings (from config.py)", open=False):
        gr.Markdown(training_settings_markdown(), elem_id="training-settings")
    return {"iterations": iterations, "run_btn": run_btn, "stop_btn": stop_btn, "progress": progress, "checkpoint": checkpoint}


def _views_sections() -> dict[str, Any]:
    """Sections 3 and 4: the four training views and the three prediction views."""
    gr.Markdown("## 3. Training views (latest training canvas)", elem_classes=["section-title"])
    with gr.Row():
        train_original = _image("Original canvas: frames t-2, t-1, t with action separators", "train-original", CANVAS_HEIGHT)
        train_masked = _image("Masked canvas overlay (grey = masked patches to inpaint)", "train-masked", CANVAS_HEIGHT)
    with gr.Row():
        train_inpainting = _image("Full inpainting output (every patch as the model sees it)", "train-inpainting", CANVAS_HEIGHT)
        train_composite = _image("Composite: visible patches + inpainted masked slot", "train-composite", CANVAS_HEIGHT)

    gr.Markdown("## 4. Prediction views", elem_classes=["section-title"])
    with gr.Row():
        pred_current = _image("Current frame t (2x)", "pred-current", FRAME_HEIGHT)
        pred_next = _image("Predicted next frame t+1 (2x)", "pred-next", FRAME_HEIGHT)
        pred_error = _image("Prediction error |predicted - actual| (amplified)", "pred-error", FRAME_HEIGHT)
    prediction_info = gr.Markdown(elem_id="prediction-info")
    return {"train_original": train_original, "train_masked": train_masked, "train_inpainting": train_inpainting, "train_composite": train_composite, "pred_current": pred_current, "pred_next": pred_next, "pred_error": pred_error, "prediction_info": prediction_info}


def _metrics_section() -> dict[str, Any]:
    """Section 5: the metric graphs and their legend."""
    gr.Markdown("## 5. Metric graphs (kept across runs of this tab's model)", elem_classes=["section-title"])
    with gr.Row():
        plot_error = _plot("Prediction error (MSE)", "plot-error", "MSE", ERROR_COLOURS)
        plot_dot = _plot(f"Dot found: share of the last {APP.dot_window} predictions within 3 px", "plot-dot", "%",
                         y_lim=[0, 100])
    with gr.Row():
        plot_time = _plot("Iteration time", "plot-time", "milliseconds")
        plot_loss = _plot("Training loss", "plot-loss", "loss", LOSS_COLOURS)
    gr.Markdown(
        "**Prediction error:** the model (indigo line) against a baseline that simply repeats the last frame "
        "(grey line); a model below the baseline has learned the motion. **Dot found:** of the last "
        f"{APP.dot_window} predictions, the share whose dot centre lies within 3 px of the true one (a prediction "
        "without a dot counts as a miss); it jumps when the model localises the dot. **Training loss:** the optimised, "
        "dot-weighted loss (red line) and the plain masked-patch MSE (orange line). Histories longer than "
        "2000 points are thinned evenly.", elem_id="plot-legend")
    return {"plot_error": plot_error, "plot_dot": plot_dot, "plot_time": plot_time, "plot_loss": plot_loss}


def _attention_section(cfg: AutoencoderConcatPredictorWorldModelConfig) -> dict[str, Any]:
    """Section 6: attention controls (one checkbox per decoder layer and head of ``cfg``), picture and statistics."""
    gr.Markdown("## 6. Decoder attention (from the last run; controls redraw without running the model)",
                elem_classes=["section-title"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            quantile = gr.Slider(0, 100, value=APP.default_quantile, step=0.5, elem_id="attn-quantile",
                                 label="Quantile threshold (95 = strongest 5%)")
            colours = ", ".join(f"L{i} {LAYER_COLOUR_NAMES[i % len(LAYER_COLOUR_NAMES)]}" for i in range(cfg.decoder_depth))
            gr.Markdown(f"**Decoder layers** (line colours: {colours})")
            with gr.Row():
                layer_boxes = [gr.Checkbox(value=True, label=f"L{i}", elem_id=f"attn-layer-{i}", min_width=60)
                               for i in range(cfg.decoder_depth)]
            gr.Markdown("**Attention heads** (combined by the aggregation below)")
            with gr.Row():
                head_boxes = [gr.Checkbox(value=True, label=f"H{i}", elem_id=f"attn-head-{i}", min_width=60)
                              for i in range(cfg.decoder_num_heads)]
            aggregation = gr.Radio(list(AGGREGATIONS), value="mean", label="Aggregation over heads",
                                   elem_id="attn-aggregation")
            viz_type = gr.Radio(list(VIZ_TYPES), value=VIZ_LINES, label="Visualization", elem_id="attn-viz-type")
        with gr.Column(scale=5):
            attn_image = _image("Decoder attention", "attn-image", ATTENTION_HEIGHT)
            attn_stats = gr.Markdown(NOTHING_RUN_YET, elem_id="attn-stats")
    return {"quantile": quantile, "layer_boxes": layer_boxes, "head_boxes": head_boxes, "aggregation": aggregation, "viz_type": viz_type, "attn_image": attn_image, "attn_stats": attn_stats}


def _wire(demo: gr.Blocks, registry: TabRegistry, user: gr.State, c: dict[str, Any]) -> None:
    """Connect the page's components (``c``, by name) to the handlers and name the API endpoints."""
    run_outputs = [c[key] for key in RUN_OUTPUT_KEYS]
    refresh_outputs = [c["session_dropdown"], c["broken_md"]]
    demo.load(refresh_sessions, None, refresh_outputs, api_name="initial_sessions", api_visibility="private")
    demo.load(registry.register, [user], [user], api_name="register_tab", api_visibility="private")
    demo.unload(registry.release)
    c["refresh_btn"].click(refresh_sessions, None, refresh_outputs, api_name="refresh_sessions")
    c["load_btn"].click(load_session, [c["session_dropdown"], user],
                        [user, c["session_info"], c["frame_slider"], c["frame_image"], c["frame_info"], c["jump_number"]],
                        api_name="load_session", preprocess=False)
    c["frame_slider"].change(update_frame, [c["frame_slider"], user], [c["frame_image"], c["frame_info"], c["jump_number"]],
                             api_name="update_frame", preprocess=False, trigger_mode="always_last",
                             concurrency_limit=None, show_progress="hidden")
    jump_inputs, jump_outputs = [c["jump_number"], user], [c["frame_slider"], c["frame_image"], c["frame_info"]]
    c["jump_btn"].click(jump_to_frame, jump_inputs, jump_outputs, api_name="jump_to_frame", preprocess=False)
    c["jump_number"].submit(jump_to_frame, jump_inputs, jump_outputs, api_visibility="private", preprocess=False)
    # concurrency_id is global across users, so the limit lets several tabs train at once;
    # each tab's own runs are serialised by its controller
    run_event = c["run_btn"].click(run_world_model, [c["iterations"], user], [user, *run_outputs],
                                   api_name="run_world_model", preprocess=False, concurrency_id="model",
                                   concurrency_limit=4, show_progress="minimal", show_progress_on=[c["progress"]])
    c["stop_btn"].click(stop_run, [user], run_outputs, api_name="stop", cancels=[run_event], concurrency_limit=None,
                        show_progress="hidden")
    controls = [c["quantile"], *c["layer_boxes"], *c["head_boxes"], c["aggregation"], c["viz_type"]]
    gr.on([control.change for control in controls], update_attention_viz, [*controls, user],
          [c["attn_image"], c["attn_stats"]], api_name="update_attention_viz", preprocess=False,
          trigger_mode="always_last", concurrency_limit=None, show_progress="hidden")


def build_demo(config: AutoencoderConcatPredictorWorldModelConfig = MODEL_CFG, cache_frequency_s: int = 600,
               cache_age_s: int = 3600) -> gr.Blocks:
    """Declare the page and wire the handlers; launches nothing.

    Args:
        config: the world model's settings (the attention controls follow its decoder depth and heads).
        cache_frequency_s: how often Gradio sweeps its image cache.
        cache_age_s: cached image files older than this are deleted.
    """
    registry = TabRegistry()
    with gr.Blocks(title="Concat World Model Explorer", delete_cache=(cache_frequency_s, cache_age_s)) as demo:
        pool = ModelPool(APP.idle_park_s, APP.max_resident_models, min(APP.park_sweep_s, APP.idle_park_s / 2), APP.park_dir)
        user = gr.State(UserState(pool, config), delete_callback=release_user)
        gr.Markdown(
            "# Concat World Model Explorer\nLoad a recorded toroidal-dot session, scrub its frames, run the "
            "canvas-inpainting world model and explore why it predicts what it does.", elem_id="app-title")

        c = {**_session_section(), **_run_section(), **_views_sections(), **_metrics_section(), **_attention_section(config)}
        _wire(demo, registry, user, c)
    return demo


# -----------------------------------------------------------------------------
# command line and launch


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {port}")
    return port


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASS with a non-empty user name and password")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    """The command line; GRADIO_SERVER_NAME and GRADIO_SERVER_PORT supply the defaults when set."""
    parser = argparse.ArgumentParser(prog="concat_world_model_explorer_gradio.py",
                                     description="Serve the Concat World Model Explorer web app.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or APP.host,
                        help="listen address (default 0.0.0.0; 127.0.0.1 keeps it private to this machine)")
    parser.add_argument("--port", type=_port, default=os.environ.get("GRADIO_SERVER_PORT") or str(APP.port),
                        help="listen port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--auth", type=_auth, default=None, metavar="USER:PASS",
                        help="require this user name and password on every page and API route")
    parser.add_argument("--public", action="store_true", help="allow --share without --auth (anyone with the link)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    return parser


def share_refusal(args: argparse.Namespace) -> str | None:
    """Why the options are refused (a public link that anybody could use to run code on this machine), or None."""
    if args.share and args.auth is None and not args.public:
        return ("Refusing --share without --auth: a share link is public, and anyone who finds it could use "
                "this machine's CPU/GPU and write checkpoints. Add --auth USER:PASS, or --public if you really "
                "want an open link.")
    return None


PUBLIC_WARNING = ("Warning: --share --public without --auth: anyone who finds the share link can use this app, "
                  "its CPU/GPU and its checkpoint file.")


def should_open_browser(no_browser: bool) -> bool:
    """Open a browser tab only where there is a display to show it."""
    if no_browser:
        return False
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def ensure_demo_sessions() -> list[Path]:
    """Record the demo sessions when the sessions folder holds no loadable session."""
    if any(s.ok for s in scan_sessions()):
        return []
    patterns = APP.demo_sessions
    print(f"No loadable sessions in {config.SESSIONS_ROOT}: recording {len(patterns)} demo sessions "
          f"({', '.join(patterns)}; {APP.demo_session_steps} steps each).", flush=True)
    return [record_session(p, APP.demo_session_steps, seed) for seed, p in enumerate(patterns)]


def allow_nested_event_loop() -> None:
    """Inside a running event loop (a notebook) let Gradio's own asyncio calls nest."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    import nest_asyncio

    nest_asyncio.apply(loop)


def launch(demo: gr.Blocks, args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    """Queue and serve ``demo``; say so when the share tunnel cannot be made and keep serving locally."""
    allow_nested_event_loop()
    if args.share and args.auth is None:
        print(PUBLIC_WARNING, file=sys.stderr, flush=True)
    demo.queue(default_concurrency_limit=1)
    guards = (LoginGuard, LoginDelay, UploadRefusal) if args.auth else (UploadRefusal,)  # the first is outermost
    app_kwargs = {"middleware": [Middleware(guard) for guard in guards]}
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=args.auth,
                inbrowser=should_open_browser(args.no_browser), show_error=True, prevent_thread_lock=True,
                theme=THEME, css=CSS, blocked_paths=never_served_paths(gr.utils.get_upload_folder()),
                max_file_size=MAX_UPLOAD_BYTES, app_kwargs=app_kwargs)
    if args.share and not demo.share_url:
        print(f"Could not create a public share link (is this machine offline?). "
              f"Still serving locally at {demo.local_url}", flush=True)
    if block:
        demo.block_thread()
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, record demo sessions when needed and serve the app; returns the exit code."""
    args = build_parser().parse_args(argv)
    refusal = share_refusal(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    if APP.malloc_arenas:
        limit_malloc_arenas(APP.malloc_arenas)  # before the worker threads exist: freed models' memory goes back
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    LOG.setLevel(logging.INFO)
    ensure_demo_sessions()
    launch(build_demo(), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
