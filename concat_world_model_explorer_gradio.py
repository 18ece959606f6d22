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
``/update_frame``, ``/jump_to_frame``, ``/run_world_model`` (a generator), ``/stop``,
``/update_attention_viz``, ``/patch_attention``, and the analysis section's ``/counterfactual``,
``/rollout``, ``/evaluate_session`` and ``/train_single_canvas`` (a generator). Usage::

    python concat_world_model_explorer_gradio.py [--host 0.0.0.0] [--port 7860] [--share]
        [--auth USER:PASS] [--public] [--no-browser]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import tempfile
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
from attention_draw import draw_attention, patch_picker_image, picker_patch, render_patch_attention
from attention_viz import AGGREGATIONS, VIZ_HEATMAP, VIZ_LINES, VIZ_TYPES
from autoencoder_concat_predictor_world_model import (
    CheckpointError,
    ModelPool,
    RunBusyError,
    RunController,
    RunStatus,
    checkpoint_summaries,
    limit_malloc_arenas,
)
from world_model_analysis import ACTIONS, Evaluation, prediction_frames
from config import AppConfig, AutoencoderConcatPredictorWorldModelConfig
from record_session import record_session
from run_export import write_export
from toroidal_action_selectors import PATTERN_NAMES
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
PATCH_ATTENTION_HEIGHT = 760  # one patch's attention: 3 rows of 2 layer panels stay legible at the page width
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
    "plot_dot", "attn_image", "attn_stats", "frame_slider", "pred_canvas", "plot_lr", "plot_grad", "attn_picker",
    "history_slider",
)
# what single-canvas training writes: its progress and loss curve, the four training views, then (at the end)
# the checkpoint status and the attention outputs, recaptured from the changed model
CANVAS_OUTPUT_KEYS = ("canvas_progress", "canvas_plot", "train_original", "train_masked", "train_inpainting",
                      "train_composite", "checkpoint", "attn_image", "attn_stats", "attn_picker")
PICKER_SCALE = 2  # the clickable picture of the predicted frame is shown at this enlargement
TRAIN_VIEW_KEYS = ("train_original", "train_masked", "train_inpainting", "train_composite")
PREDICTION_KEYS = ("pred_current", "pred_next", "pred_error", "prediction_info", "pred_canvas")


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
        options = dict(config=config, run_lock_wait_s=APP.run_lock_wait_s, stop_grace_s=APP.stop_grace_s,
                       history_snapshots=APP.history_snapshots, history_bytes=APP.history_bytes)
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
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def code_span(text: Any) -> str:
    """``text`` as markdown inline code: shown literally (markdown escapes would show as backslashes
    inside it), backticks replaced so the span cannot end early."""
    return "`" + str(text).replace("`", "'") + "`"


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
SERIES_GRAD, SERIES_CLIP = "gradient norm (before clipping)", "clip threshold"
SERIES_STAY, SERIES_MOVE, SERIES_REPEAT = "model, after stay", "model, after move", "baseline: repeat frame t"
ERROR_COLOURS = {SERIES_PREDICTION: "#4f46e5", SERIES_BASELINE: "#9ca3af"}
LOSS_COLOURS = {SERIES_LOSS: "#dc2626", SERIES_MSE: "#f59e0b"}
GRAD_COLOURS = {SERIES_GRAD: "#0d9488", SERIES_CLIP: "#9ca3af"}
EVALUATION_COLOURS = {SERIES_STAY: "#dc2626", SERIES_MOVE: "#16a34a", SERIES_REPEAT: "#9ca3af"}
PLOT_KEYS = ("plot_error", "plot_time", "plot_loss", "plot_dot", "plot_lr", "plot_grad")  # metric_frames order
CLIP_SHOWN_FROM = 0.5  # the gradient graph draws the clip threshold once a norm reaches this share of it


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


def _two_series(history: list[dict], colours: dict[str, str], keys: tuple[str, str]) -> pd.DataFrame:
    (first, second), (a, b) = list(colours), keys
    return pd.concat([series_anchors(colours), _series(history, a, first), _series(history, b, second)],
                     ignore_index=True)


def metric_frames(history: list[dict], grad_clip: float = 0.0) -> tuple[pd.DataFrame, ...]:
    """Long-format DataFrames for the graphs, in ``PLOT_KEYS`` order: prediction error, iteration time,
    training loss, the rolling share of predictions that put the dot within 3 px, learning rate and
    gradient norm (with the clip threshold as a flat line when clipping is on)."""
    error = _two_series(history, ERROR_COLOURS, ("prediction_error", "copy_error"))
    timing = _series(history, "iteration_time", "iteration time", scale=1000.0)
    loss = _two_series(history, LOSS_COLOURS, ("training_loss", "training_mse"))
    dot = _series(dot_found_rows(history, APP.dot_window), "within_3px_share", "within 3 px")
    lr = _series(history, "lr", "learning rate")
    norms = [r for r in history if r.get("grad_norm") is not None]
    # the threshold is drawn once norms come near it: far above them it would flatten their line
    near = grad_clip and norms and max(r["grad_norm"] for r in norms) >= CLIP_SHOWN_FROM * grad_clip
    clip = [{"iteration": r["iteration"], "clip": grad_clip} for r in (norms[0], norms[-1])] if near else []
    grad = pd.concat([series_anchors(GRAD_COLOURS), _series(norms, "grad_norm", SERIES_GRAD),
                      _series(clip, "clip", SERIES_CLIP)], ignore_index=True)
    return error, timing, loss, dot, lr, grad


def _span(rows: list[dict]) -> list[int]:
    """An iteration axis at least ``MIN_ITERATION_SPAN`` wide: a shorter one gets ticks between whole
    iterations (Gradio exposes no tick step), labelled 1, 2, 2 by the "d" format."""
    first = rows[0]["iteration"] if rows else 1
    last = rows[-1]["iteration"] if rows else 1
    return [first, max(last, first + MIN_ITERATION_SPAN - 1)]


def plot_updates(history: list[dict], grad_clip: float = 0.0) -> tuple[dict, ...]:
    """The metric graphs (``PLOT_KEYS`` order) as updates carrying their iteration axis span."""
    span = _span(history)
    return tuple(gr.update(value=frame, x_lim=span) for frame in metric_frames(history, grad_clip))


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
    elif origin.kind == "reset":
        parts = [f"**Model reset:** a fresh, untrained model; its first run saves to {shown} as usual."]
    elif origin.kind == "refused":
        parts = [f"**Checkpoint refused:** {markdown_escape(_hide_paths(origin.reason))}. Training a fresh model "
                 "instead; the refused file is kept beside it under a new name when this model first saves."]
    else:
        parts = [f"**Checkpoint:** none found at {shown}; training a fresh model."]
    if saved is not None and saved.ok:
        text = f"**Saved** to `{_display_path(saved.path)}` after the last run: step {saved.step}, iteration {saved.iteration}."
        if saved.set_aside:
            text += f" The refused file was kept as {code_span(saved.set_aside)}."
        elif saved.reason:
            text += f" ({markdown_escape(saved.reason)}.)"
        parts.append(text)
    elif saved is not None:
        parts.append(f"**Checkpoint not saved:** {markdown_escape(_hide_paths(saved.reason))}")
    if c.shared_checkpoint_replaced():
        parts.append(f"**Note:** another tab saved {shown} after this tab last loaded or saved it; this tab's next "
                     "run will save over it. Save a named checkpoint (section 8) to keep both.")
    return "\n\n".join(parts)


def progress_markdown(status: RunStatus) -> str:
    """Progress k/N with the latest prediction error, iteration time and loss, and the model's counters."""
    if status.state == "idle":
        if status.model_step is None:
            return "_Not run yet._"
        return f"_Not run yet with this model_ | model step {status.model_step}, iteration {status.model_iteration}"
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
    """Current frame, predicted next frame, amplified error map (with its label), a summary and the
    prediction canvas (``PREDICTION_KEYS`` order)."""
    views = views or {"current": None, "predicted": None, "error": None, "error_mse": None, "canvas": None}
    error, gain = amplify_error(views["error"])
    mse = views["error_mse"]
    label = f"Prediction error |predicted - actual| (MSE {_fmt(mse)}; brightness x{gain:.1f} for visibility)"
    info = (
        f"**Prediction error of the current frame (MSE):** {_fmt(mse)}. The error map compares the prediction "
        f"made one iteration earlier with the frame that then arrived; it is amplified x{gain:.1f} so faint "
        "differences show. _Predicted next frame_ is the model's guess for the frame after the current one."
    )
    return (upscale(views["current"]), upscale(views["predicted"]), gr.update(value=upscale(error), label=label), info,
            views["canvas"])


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


def attention_picker(user: UserState, selected: tuple[int, int] | None = None) -> np.ndarray | None:
    """The predicted frame of the attention capture, enlarged with its patch grid (the ``selected``
    patch ringed): click a patch."""
    attention = user.controller.attention
    if attention is None or attention.prediction is None:
        return None
    return patch_picker_image(attention.prediction, attention.patch_size, PICKER_SCALE, selected)


def training_view_outputs(c: RunController) -> tuple:
    """The four training views, ``TRAIN_VIEW_KEYS`` order (None before the first training step)."""
    train = c.training_views() or {}
    return tuple(train.get(k) for k in ("original", "masked", "inpainting", "composite"))


def _display_outputs(user: UserState, final: bool, first: bool = False) -> tuple:
    """Values for RUN_OUTPUT_KEYS; while running, the slow-changing outputs are skipped."""
    c = user.controller
    out = dict.fromkeys(RUN_OUTPUT_KEYS, gr.skip())
    out["progress"] = progress_markdown(c.status())
    if final or first or not c.has_model:
        out["checkpoint"] = checkpoint_markdown(c)
    if not c.has_model:
        return tuple(out[k] for k in RUN_OUTPUT_KEYS)
    out.update(zip(TRAIN_VIEW_KEYS, training_view_outputs(c)))
    out.update(zip(PREDICTION_KEYS, prediction_outputs(c.prediction_views())))
    out.update(zip(PLOT_KEYS, plot_updates(c.history, c.config.grad_clip)))
    if final:
        out["attn_image"], out["attn_stats"] = attention_outputs(user)
        out["attn_picker"] = attention_picker(user)
        out["frame_slider"] = gr.Slider(value=c.start_frame)
        out["history_slider"] = history_slider(c)
    return tuple(out[k] for k in RUN_OUTPUT_KEYS)


def history_slider(c: RunController) -> gr.Slider:
    """The run-history slider over the kept iterations, at the latest."""
    kept = c.snapshots.iterations
    if not kept:
        return gr.Slider(minimum=0, maximum=1, value=0, interactive=False)
    return gr.Slider(minimum=kept[0], maximum=max(kept[-1], kept[0] + 1), value=kept[-1], step=1, interactive=True,
                     label=f"Run history: iteration ({len(kept)} kept, " + (
                         "every iteration)" if c.snapshots.stride == 1 else f"every {c.snapshots.stride}th iteration)"))


# -----------------------------------------------------------------------------
# handlers


def refresh_sessions() -> tuple[gr.Dropdown, str]:
    """Scan the sessions folder: loadable sessions go in the list, broken ones are listed with the reason."""
    summaries = scan_sessions()
    names = [s.name for s in summaries if s.ok]
    return gr.Dropdown(choices=names, value=names[0] if names else None), broken_sessions_markdown(summaries)


def open_session(session_choice: Any) -> Session:
    """The session of that name from the sessions folder; ``gr.Error`` naming the problem otherwise."""
    if session_choice is None or session_choice == "":
        raise gr.Error("Choose a session in the list first (press Refresh sessions if it is empty).")
    try:
        session_dir = resolve_session_dir(session_choice)
    except ValueError:
        raise gr.Error(UNKNOWN_SESSION) from None
    try:
        return load_session_from_disk(session_dir)
    except SessionError as e:
        raise gr.Error(f"Cannot load session {session_choice}: {_hide_paths(e)}") from None


def session_names() -> gr.Dropdown:
    """The loadable sessions, for the evaluation list (kept in step with the session list)."""
    names = [s.name for s in scan_sessions() if s.ok]
    return gr.Dropdown(choices=names, value=names[0] if names else None)


def load_session(session_choice: Any, user: UserState) -> tuple:
    """Load a session by name; the tab's model (if any) is kept and replays it at the next Run."""
    session = open_session(session_choice)
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
# analysis (section 7) and patch attention: pictures, text and handlers


def _dot(value: float) -> str:
    """A dot error from an analysis: NaN means the actual frame has no dot to compare with."""
    return "no dot in the actual frame" if value is not None and math.isnan(value) else _px(value)


def _share(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.0f} %"


def _model_line(step: int | None, iteration: int | None) -> str:
    return f"model step {step}, iteration {iteration}" + (" (untrained)" if step == 0 else "")


def _model_now(c: RunController) -> str:
    status = c.status()
    return _model_line(status.model_step, status.model_iteration)


def counterfactual_outputs(cf, model_line: str) -> tuple:
    """[one picture per action (the recorded one named in its label), the actual frame, markdown]."""
    name = {a: ACTION_NAMES.get(a, str(a)) for a in cf.actions}
    pictures = tuple(gr.update(value=upscale(cf.predictions[i]),
                               label=f"Frame {cf.frame_index + 1} if {name[a]}"
                                     + (" (recorded)" if a == cf.recorded_action else ""))
                     for i, a in enumerate(cf.actions))
    rows = [f"| {name[a]}{' (recorded)' if a == cf.recorded_action else ''} | {_fmt(cf.mse[i])} | {_dot(cf.dot_error[i])} |"
            for i, a in enumerate(cf.actions)]
    text = "\n".join([
        f"**Frame {cf.frame_index} -> {cf.frame_index + 1}**: the recorded action after frame {cf.frame_index} was "
        f"**{name[cf.recorded_action]}**; {model_line}. Each picture is the model's frame {cf.frame_index + 1} "
        "from the same history with the last action swapped.", "",
        f"| action | MSE vs the actual frame {cf.frame_index + 1} | dot error |", "|---|---|---|", *rows])
    actual = gr.update(value=upscale(cf.actual), label=f"Actual frame {cf.frame_index + 1}")
    return (*pictures, actual, text)


def rollout_strip(actual: np.ndarray, predicted: np.ndarray, gap: int = 4) -> tuple[np.ndarray, float]:
    """Rows actual / predicted / |error| (one gain for the whole strip), one column per step, white gaps.

    Args:
        actual, predicted: uint8 (k, H, W, 3).

    Returns:
        (uint8 (3H + 2 gap, kW + (k-1) gap, 3), the error gain).
    """
    error, gain = amplify_error(np.abs(predicted.astype(np.int16) - actual).astype(np.uint8))  # (k, H, W, 3)
    rows = np.stack([actual, predicted, error])  # (3, k, H, W, 3)
    padded = np.pad(rows, ((0, 0), (0, 0), (0, gap), (0, gap), (0, 0)), constant_values=255)  # (3, k, H+g, W+g, 3)
    _, k, h, w, _ = padded.shape
    strip = padded.transpose(0, 2, 1, 3, 4).reshape(3 * h, k * w, 3)  # (3(H+g), k(W+g), 3)
    return np.ascontiguousarray(strip[:-gap, :-gap]), gain


def rollout_outputs(ro, model_line: str) -> tuple:
    """[strip picture (labelled), per-step table, markdown summary]."""
    strip, gain = rollout_strip(ro.actual, ro.predicted)
    t, k = ro.frame_index, len(ro.mse)
    table = pd.DataFrame({
        "step": np.arange(1, k + 1), "frame": np.arange(t + 1, t + k + 1),
        "action before it": [ACTION_NAMES.get(int(a), str(a)) for a in ro.actions],
        "model MSE": np.round(ro.mse, 6), "copy MSE (frame t repeated)": np.round(ro.copy_mse, 6),
        "dot error": [_dot(float(e)) for e in ro.dot_error]})
    label = (f"Open-loop rollout from frame {t}: rows actual, predicted, |error| x{gain:.1f}; "
             f"columns frames {t + 1}-{t + k}")
    beats = int((ro.mse < ro.copy_mse).sum())
    text = (f"**{k} steps imagined from frame {t}** with the recorded actions, each prediction fed back as "
            f"history ({model_line}). MSE goes {_fmt(ro.mse[0])} -> {_fmt(ro.mse[-1])}; the model beats repeating "
            f"frame {t} at {beats} of {k} steps.")
    return gr.update(value=strip, label=label), table, text


def evaluation_outputs(ev: Evaluation) -> tuple[str, pd.DataFrame]:
    """[markdown table overall / after stay / after move, per-transition scatter data]."""
    rows = []
    for title, action in (("all", None), *((f"after {ACTION_NAMES.get(a, a)}", a) for a in ACTIONS)):
        m = ev.summary(action)
        if not m["n"]:
            rows.append(f"| {title} | 0 | | | | | | |")
            continue
        rows.append(f"| {title} | {m['n']} | {_fmt(m['prediction_mse'])} | {_fmt(m['copy_mse'])} | "
                    f"{_fmt(m['mse_ratio'], 3)} | {_share(m['dot_present'])} | {_share(m['within_3px'])} | "
                    f"{_dot(m['median_dot_error_px'])} |")
    text = "\n".join([
        f"**Session {markdown_escape(ev.session_name)}**: {len(ev.mse)} transitions predicted by the {_model_line(ev.model_step, ev.model_iteration)} "
        f"in {ev.seconds:.1f} s (batched, no training). MSE ratio < 1: better than repeating the last frame.", "",
        "| transitions | n | model MSE | copy MSE | ratio | dot drawn | within 3 px | median dot error |",
        "|---|---|---|---|---|---|---|---|", *rows])
    series = np.where(ev.action == ACTIONS[0], SERIES_STAY, SERIES_MOVE)  # (T,)
    model = pd.DataFrame({"frame": ev.frame_index, "MSE": ev.mse, "series": series})
    copy = pd.DataFrame({"frame": ev.frame_index, "MSE": ev.copy_mse, "series": SERIES_REPEAT})
    anchors = pd.DataFrame({"frame": [np.nan] * 3, "MSE": [np.nan] * 3, "series": list(EVALUATION_COLOURS)})
    return text, pd.concat([anchors, copy, model], ignore_index=True)


def _analysis_frame(frame_index: Any, user: UserState) -> int:
    """The analysis section's frame t, checked against the loaded session (t needs a frame before and after)."""
    session = require_session(user)
    try:
        first, last = prediction_frames(session, user.controller.config)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    return whole_number(frame_index, "Frame index", first, last)


def counterfactual(frame_index: Any, user: UserState) -> tuple:
    """The model's frame t+1 under each action beside the recorded frame t+1 (never trains)."""
    t = _analysis_frame(frame_index, user)
    try:
        cf = user.controller.counterfactual(t)
    except (ValueError, SessionError) as e:
        raise gr.Error(f"Cannot compare actions at frame {t}: {_hide_paths(e)}") from None
    return counterfactual_outputs(cf, _model_now(user.controller))


def rollout(frame_index: Any, k: Any, user: UserState) -> tuple:
    """k open-loop steps from frame t with the recorded actions (never trains)."""
    t = _analysis_frame(frame_index, user)
    steps = whole_number(k, "Steps k", 1, APP.max_rollout_steps)
    try:
        ro = user.controller.rollout(t, steps, APP.max_rollout_steps)
    except (ValueError, SessionError) as e:
        raise gr.Error(f"Cannot roll out from frame {t}: {_hide_paths(e)}") from None
    return rollout_outputs(ro, _model_now(user.controller))


def evaluate_session(session_choice: Any, user: UserState) -> tuple[str, pd.DataFrame]:
    """The tab's model on every transition of a session (any session; batched, never trains)."""
    session = open_session(session_choice)
    try:
        ev = user.controller.evaluate(session, APP.evaluation_batch)
    except (ValueError, SessionError) as e:
        raise gr.Error(f"Cannot evaluate session {session_choice}: {_hide_paths(e)}") from None
    return evaluation_outputs(ev)


def canvas_outputs(user: UserState, t: int, total: int, curve: list[dict], final: bool) -> tuple:
    """Values for CANVAS_OUTPUT_KEYS; the checkpoint and attention only at the end."""
    c = user.controller
    out = dict.fromkeys(CANVAS_OUTPUT_KEYS, gr.skip())
    last = curve[-1] if curve else {}
    state = "Done" if final and len(curve) == total else ("Stopped" if final else "Training")
    out["canvas_progress"] = (
        f"**{state}: {len(curve)}/{total}** steps on the canvas ending at frame {t} | masked MSE "
        f"{_fmt(curve[0]['mse'] if curve else None)} -> {_fmt(last.get('mse'))} | learning rate {_fmt(last.get('lr'), 3)} | "
        f"gradient norm {_fmt(last.get('grad_norm'), 3)} | model step {last.get('step', 'n/a')}")
    out["canvas_plot"] = gr.update(value=_two_series(curve, LOSS_COLOURS, ("loss", "mse")), x_lim=_span(curve))
    out.update(zip(TRAIN_VIEW_KEYS, training_view_outputs(c)))
    if final:
        out["checkpoint"] = checkpoint_markdown(c)
        out["attn_image"], out["attn_stats"] = attention_outputs(user)
        out["attn_picker"] = attention_picker(user)
    return tuple(out[k] for k in CANVAS_OUTPUT_KEYS)


def train_single_canvas(frame_index: Any, steps: Any, user: UserState):
    """Train this tab's model for ``steps`` (1-200) optimizer steps on the canvas ending at frame t
    alone, streaming the loss curve and the training views; saved like a run; Stop ends it."""
    session = require_session(user)
    first = user.controller.config.canvas_history_size - 1
    t = whole_number(frame_index, "Frame index", first, max(first, session.num_frames - 1))
    total = whole_number(steps, "Steps", 1, APP.max_canvas_steps)
    try:
        work = user.controller.train_single_canvas(t, total)
    except (ValueError, SessionError) as e:
        raise gr.Error(f"Cannot train on the canvas ending at frame {t}: {_hide_paths(e)}") from None
    curve, last_yield = [], -math.inf
    try:
        for step in work:
            if step is not None:
                curve.append({**step, "iteration": len(curve) + 1})
            if step is None or time.monotonic() - last_yield >= APP.update_interval_s:
                yield (user, *canvas_outputs(user, t, total, curve, final=False))
                last_yield = time.monotonic()
    except RunBusyError:
        raise gr.Error("A run is in progress in this tab: press Stop or wait for it to finish.") from None
    yield (user, *canvas_outputs(user, t, total, curve, final=True))


def patch_attention_outputs(user: UserState, row: int, col: int) -> tuple[np.ndarray, str]:
    attention = user.controller.attention
    if attention is None:
        raise gr.Error("Run the world model first: patch attention reads the decoder attention captured at the end of a run.")
    _, layers, heads, aggregation, _ = user.attention_controls
    if not layers or not heads:
        raise gr.Error("Select at least one decoder layer and one attention head in section 6.")
    try:
        image, _, text = render_patch_attention(attention, row, col, layers, heads, aggregation)
    except ValueError as e:
        raise gr.Error(f"Cannot draw the attention of patch ({row}, {col}): {e}") from None
    return image, text


def patch_attention(row: Any, col: Any, user: UserState) -> tuple[np.ndarray, str, np.ndarray]:
    """Where one patch of the predicted frame looks: its attention in each selected decoder layer
    (heads combined with section 6's aggregation), its strongest source patches, and the predicted
    frame with that patch ringed."""
    cfg = user.controller.config
    rows, cols = cfg.frame_size[0] // cfg.patch_size, cfg.frame_size[1] // cfg.patch_size
    r = whole_number(row, "Patch row", 0, rows - 1)
    c = whole_number(col, "Patch column", 0, cols - 1)
    return (*patch_attention_outputs(user, r, c), attention_picker(user, (r, c)))


def pick_patch(user: UserState, evt: gr.SelectData) -> tuple:
    """A click on the predicted frame picks the patch under it (the picture is enlarged ``PICKER_SCALE``x)."""
    attention = user.controller.attention
    if attention is None or attention.prediction is None:
        raise gr.Error("Run the world model first: the predicted frame to click comes from the last run.")
    try:
        shown = tuple(PICKER_SCALE * n for n in attention.prediction.shape[:2])  # the enlarged picture's (H, W)
        row, col = picker_patch(evt.index[0], evt.index[1], shown, attention.patch_size, PICKER_SCALE)
    except (ValueError, TypeError, IndexError) as e:
        raise gr.Error(f"That click is not on a patch of the predicted frame: {e}") from None
    return (row, col, attention_picker(user, (row, col)), *patch_attention_outputs(user, row, col))


# -----------------------------------------------------------------------------
# workflow (section 8): named checkpoints and reset


def checkpoints_markdown(c: RunController) -> str:
    """The checkpoint folder as a table: name, step, iteration, time saved, session trained on."""
    summaries = checkpoint_summaries(c.checkpoint_path.parent)
    if not summaries:
        return "_No checkpoints saved yet._"
    rows = []
    for s in summaries:
        name = markdown_escape(s.name) + (" (shared: every run saves here)" if s.path == c.checkpoint_path else "")
        if s.problem:
            rows.append(f"| {name} | | | | {markdown_escape(_hide_paths(s.problem))} |")
        else:
            rows.append(f"| {name} | {s.step} | {s.iteration} | {format_timestamp(s.saved_at)} | "
                        f"{markdown_escape(s.session or 'not recorded')} |")
    return "\n".join(["| checkpoint | step | iteration | saved | session trained on |", "|---|---|---|---|---|", *rows])


def checkpoint_choices(c: RunController, value: str | None = None) -> gr.Dropdown:
    names = [s.name for s in checkpoint_summaries(c.checkpoint_path.parent)
             if not s.problem and s.path != c.checkpoint_path]
    return gr.Dropdown(choices=names, value=value if value in names else (names[0] if names else None))


def _checkpoint_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise gr.Error("Checkpoint name must be a non-empty name (letters, digits, - and _ read best).")
    return name.strip()


def save_checkpoint(name: Any, user: UserState) -> tuple[str, gr.Dropdown]:
    """Save this tab's model as ``saved/checkpoints/toroidal_dot/<name>.pth`` (never over an existing file)."""
    name, c = _checkpoint_name(name), user.controller
    try:
        saved = c.save_named(name)
    except (ValueError, CheckpointError) as e:
        raise gr.Error(f"Cannot save checkpoint {markdown_escape(name)[:60]}: {_hide_paths(e)}") from None
    text = f"**Saved** {code_span(saved.path.name)} (step {saved.step}, iteration {saved.iteration}).\n\n"
    return text + checkpoints_markdown(c), checkpoint_choices(c, name)


def load_checkpoint(name: Any, user: UserState) -> tuple:
    """Load a named checkpoint into this tab's model; a damaged or foreign file is refused, model untouched."""
    name, c = _checkpoint_name(name), user.controller
    try:
        origin = c.load_named(name)
    except RunBusyError:
        raise gr.Error("A run is in progress in this tab: press Stop or wait for it to finish.") from None
    except (ValueError, CheckpointError) as e:
        raise gr.Error(f"Cannot load checkpoint {markdown_escape(name)[:60]}: {_hide_paths(e)}") from None
    text = f"**Loaded** {code_span(name + '.pth')} (step {origin.step}, iteration {origin.iteration}).\n\n"
    return (text + checkpoints_markdown(c), *_display_outputs(user, final=True))


def reset_model(user: UserState) -> tuple:
    """A fresh model for this tab: metric history and graphs cleared, nothing deleted on disk."""
    try:
        user.controller.reset_model()
    except RunBusyError:
        raise gr.Error("A run is in progress in this tab: press Stop or wait for it to finish.") from None
    text = "**Reset:** this tab now has a fresh, untrained model; no file was deleted.\n\n"
    return (text + checkpoints_markdown(user.controller), *_display_outputs(user, final=True))


def list_checkpoints(user: UserState) -> tuple[str, gr.Dropdown]:
    return checkpoints_markdown(user.controller), checkpoint_choices(user.controller)


# -----------------------------------------------------------------------------
# workflow: recording a session from the page


def _record_in_background(args: tuple, progress: dict) -> threading.Thread:
    """Run ``record_session`` on a thread; ``progress`` receives 'done', then 'path' or 'error'."""
    pattern, steps, seed, radius, move = args

    def work() -> None:
        try:
            progress["path"] = record_session(pattern, steps, seed, dot_radius=radius, move_pixels=move,
                                              progress=lambda done, total: progress.__setitem__("done", done))
        except Exception as e:  # reported to the page; a partial recording is kept and marked stopped
            progress["error"] = e

    thread = threading.Thread(target=work, name="record-session", daemon=True)
    thread.start()
    return thread


def record_new_session(pattern: Any, steps: Any, seed: Any, dot_radius: Any, move_pixels: Any):
    """Record a new session with ``record_session.py``'s code (a fresh folder, never over another),
    streaming progress; then refresh the session lists with it selected."""
    args = (choice(pattern, PATTERN_NAMES, "Pattern"), whole_number(steps, "Steps", 3, APP.max_record_steps),
            whole_number(seed, "Seed", 0, 2**32 - 1), whole_number(dot_radius, "Dot radius", 1, 50),
            whole_number(move_pixels, "Move pixels", 0, 223))
    progress = {"done": 0}
    thread = _record_in_background(args, progress)
    while thread.is_alive():
        thread.join(APP.update_interval_s)
        yield f"**Recording:** {progress['done']}/{args[1]} actions ({args[0]}, seed {args[2]})", gr.skip(), gr.skip()
    if "error" in progress:
        raise gr.Error(f"The recording failed: {_hide_paths(progress['error'])}")
    name = progress["path"].name
    names = [s.name for s in scan_sessions() if s.ok]
    done = (f"**Recorded** session {code_span(name)}: {args[1] + 1} frames, pattern {args[0]}, seed {args[2]}, "
            f"dot radius {args[3]} px, move {args[4]} px. It is selected above: press Load session.")
    yield done, gr.Dropdown(choices=names, value=name), gr.Dropdown(choices=names, value=name)


# -----------------------------------------------------------------------------
# workflow: the run history


def history_outputs(c: RunController, iteration: int) -> tuple:
    """[frame t, predicted frame t+1, error map, metrics] of the kept iteration nearest ``iteration``."""
    snap = c.snapshots.nearest(iteration)
    if snap is None:
        raise gr.Error("No run history yet: run the world model; each run's iterations are kept here.")
    error, gain = amplify_error(snap.error)
    m = snap.metrics
    text = (f"**Iteration {snap.iteration}**" + (f" (the kept one nearest {iteration})" if snap.iteration != iteration else "")
            + f" | prediction error (MSE): {_fmt(snap.error_mse)} | dot error: {_px(m.get('dot_error'))} | training loss: "
            f"{_fmt(m.get('training_loss'))} | learning rate: {_fmt(m.get('lr'), 3)} | gradient norm: "
            f"{_fmt(m.get('grad_norm'), 3)} | model step {m.get('step')}. The error map (x{gain:.1f}) compares the prediction made one iteration "
            "earlier with this frame.")
    return upscale(snap.current), upscale(snap.predicted), upscale(error), text


def browse_history(iteration: Any, user: UserState) -> tuple:
    """Frame, prediction, error map and metrics of the kept iteration nearest ``iteration``."""
    return history_outputs(user.controller, whole_number(iteration, "Iteration", 0, 10**9))


def play_history(iteration: Any, user: UserState):
    """Step the run-history slider from ``iteration`` to the latest kept one, a few per second."""
    start = whole_number(iteration, "Iteration", 0, 10**9)
    kept = [i for i in user.controller.snapshots.iterations if i >= start] or user.controller.snapshots.iterations
    for i in kept[:: max(1, len(kept) // APP.history_play_frames)]:
        yield (gr.Slider(value=i), *history_outputs(user.controller, i))
        time.sleep(APP.update_interval_s)


# -----------------------------------------------------------------------------
# workflow: export


def export_pictures(user: UserState) -> dict[str, tuple[np.ndarray | None, str]]:
    """The seven views and the attention picture at full resolution, with a line saying what each is."""
    c = user.controller
    train, views = c.training_views() or {}, c.prediction_views() or {}
    error, gain = amplify_error(views.get("error"))
    attention = attention_outputs(user)[0] if c.attention is not None else None
    quantile, _, _, aggregation, viz_type = user.attention_controls
    return {
        "train_original": (train.get("original"), "training view: the latest training canvas"),
        "train_masked": (train.get("masked"), "training view: masked patches greyed"),
        "train_inpainting": (train.get("inpainting"), "training view: the model's output for every patch"),
        "train_composite": (train.get("composite"), "training view: visible patches plus the inpainted slot"),
        "prediction_current": (views.get("current"), "prediction view: the current frame t"),
        "prediction_next": (views.get("predicted"), "prediction view: the predicted frame t+1"),
        "prediction_error": (error, f"prediction view: |prediction - actual| for frame t, brightness x{gain:.1f}"),
        "attention": (attention, f"decoder attention as the tab shows it: {viz_type}, quantile {quantile:g}, "
                                 f"heads combined by {aggregation}"),
    }


def export_results(user: UserState) -> str:
    """A zip of this tab's views (PNG), metric history (CSV), configuration (JSON) and a README.txt."""
    c = user.controller
    if not c.has_model:
        raise gr.Error("Nothing to export yet: run the world model first.")
    status = c.status()
    cfg = {**dataclasses.asdict(c.config), "architecture": c.config.architecture()}
    meta = {"session": c.session.name if c.session is not None else None, "model_step": status.model_step,
            "model_iteration": status.model_iteration, "iterations_in_history": len(c.history),
            "checkpoint": None if c.origin is None else f"{c.origin.kind} {_display_path(c.origin.path)}",
            "exported_at": format_timestamp(time.time())}
    folder = Path(tempfile.gettempdir()) / "cwm-exports"
    _remove_old_exports(folder)
    folder = Path(tempfile.mkdtemp(prefix="export-", dir=_private_folder(folder)))
    name = f"cwm_export_step{status.model_step}_iteration{status.model_iteration}.zip"
    return str(write_export(folder / name, export_pictures(user), c.history, cfg, meta))


def _private_folder(folder: Path) -> Path:
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _remove_old_exports(folder: Path, older_than_s: float = 3600.0) -> None:
    """Exports are handed to Gradio's cache at once; the copies here are cleaned up after an hour."""
    if not folder.is_dir():
        return
    for old in folder.glob("export-*"):
        try:
            if time.time() - old.stat().st_mtime > older_than_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


# -----------------------------------------------------------------------------
# layout


def _image(label: str, elem_id: str, height: int, **kwargs) -> gr.Image:
    # a fixed height keeps the block from collapsing while its (lazy-loaded) picture is off screen
    return gr.Image(label=label, elem_id=elem_id, height=height, format="png", type="numpy", interactive=False,
                    elem_classes=["pixelated"], buttons=["download", "fullscreen"], **kwargs)


def _plot(label: str, elem_id: str, y_title: str, colours: dict[str, str] | None = None,
          y_lim: list[float] | None = None, x_title: str = "iteration") -> gr.LinePlot:
    # Gradio sizes the Vega view to the whole block: a block label or a legend would push the axes
    # out of sight, so the title lives inside the view and the colours are named under the graphs
    if colours:
        empty = series_anchors(colours)
    else:
        empty = pd.DataFrame({"iteration": pd.Series(dtype="float64"), "value": pd.Series(dtype="float64")})
    return gr.LinePlot(empty, x="iteration", y="value", color="series" if colours else None, color_map=colours,
                       colors_in_legend=[] if colours else None, title=label, label=label, show_label=False,
                       elem_id=elem_id, x_title=x_title, y_title=y_title, height=280,
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
    pred_canvas = _image("Prediction canvas: frames t-1 and t with their actions, predicted frame t+1 filled into "
                         "the last slot", "pred-canvas", CANVAS_HEIGHT)
    return {"train_original": train_original, "train_masked": train_masked, "train_inpainting": train_inpainting, "train_composite": train_composite, "pred_current": pred_current, "pred_next": pred_next, "pred_error": pred_error, "prediction_info": prediction_info, "pred_canvas": pred_canvas}


def _metrics_section(cfg: AutoencoderConcatPredictorWorldModelConfig) -> dict[str, Any]:
    """Section 5: the metric graphs and their legend."""
    gr.Markdown("## 5. Metric graphs (kept across runs of this tab's model)", elem_classes=["section-title"])
    with gr.Row():
        plot_error = _plot("Prediction error (MSE)", "plot-error", "MSE", ERROR_COLOURS)
        plot_dot = _plot(f"Dot found: share of the last {APP.dot_window} predictions within 3 px", "plot-dot", "%",
                         y_lim=[0, 100])
    with gr.Row():
        plot_time = _plot("Iteration time", "plot-time", "milliseconds")
        plot_loss = _plot("Training loss", "plot-loss", "loss", LOSS_COLOURS)
    with gr.Row():
        plot_lr = _plot("Learning rate (warm-up, then cosine decay)", "plot-lr", "learning rate")
        plot_grad = _plot(f"Gradient norm per step (clipped at {cfg.grad_clip:g})" if cfg.grad_clip
                          else "Gradient norm per step", "plot-grad", "norm", GRAD_COLOURS)
    gr.Markdown(
        "**Prediction error:** the model (indigo line) against a baseline that simply repeats the last frame "
        "(grey line); a model below the baseline has learned the motion. **Dot found:** of the last "
        f"{APP.dot_window} predictions, the share whose dot centre lies within 3 px of the true one (a prediction "
        "without a dot counts as a miss); it jumps when the model localises the dot. **Training loss:** the optimised, "
        "dot-weighted loss (red line) and the plain masked-patch MSE (orange line). **Learning rate:** the "
        "optimizer's rate at each iteration's step. **Gradient norm:** the total gradient norm of each step before "
        "clipping (teal line); once norms come within half of the clip threshold it is drawn too (grey line): steps above it were scaled down. Histories longer "
        "than 2000 points are thinned evenly.", elem_id="plot-legend")
    return {"plot_error": plot_error, "plot_dot": plot_dot, "plot_time": plot_time, "plot_loss": plot_loss,
            "plot_lr": plot_lr, "plot_grad": plot_grad}


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
    return {"quantile": quantile, "layer_boxes": layer_boxes, "head_boxes": head_boxes, "aggregation": aggregation,
            "viz_type": viz_type, "attn_image": attn_image, "attn_stats": attn_stats, **_patch_attention_block(cfg)}


def _patch_attention_block(cfg: AutoencoderConcatPredictorWorldModelConfig) -> dict[str, Any]:
    """Inside section 6: click a patch of the predicted frame (or give its row and column) to see where it looks."""
    rows, cols = cfg.frame_size[0] // cfg.patch_size, cfg.frame_size[1] // cfg.patch_size
    gr.Markdown(f"### One patch: where does it look?\nClick a patch of the predicted frame (grid {rows} x {cols}) or "
                "enter its row and column. Layers, heads and aggregation follow the controls above.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            attn_picker = gr.Image(format="png", label="Predicted frame of the last run: click a patch",  # lossless
                                   elem_id="attn-picker", height=FRAME_HEIGHT, type="numpy", interactive=False,
                                   elem_classes=["pixelated"], buttons=["fullscreen"])
        with gr.Column(scale=3):
            with gr.Row():
                patch_row = gr.Number(value=rows // 2, precision=0, label=f"Row (0-{rows - 1})", elem_id="patch-row")
                patch_col = gr.Number(value=cols // 2, precision=0, label=f"Column (0-{cols - 1})", elem_id="patch-col")
            patch_btn = gr.Button("Show this patch's attention", elem_id="patch-btn")
            patch_md = gr.Markdown(elem_id="patch-info")
    patch_image = _image("Attention of the chosen patch: one canvas per decoder layer (cyan ring = the patch)",
                         "patch-image", PATCH_ATTENTION_HEIGHT)
    return {"attn_picker": attn_picker, "patch_row": patch_row, "patch_col": patch_col, "patch_btn": patch_btn,
            "patch_image": patch_image, "patch_md": patch_md}


def _analysis_section() -> dict[str, Any]:
    """Section 7: counterfactual actions, open-loop rollouts, whole-session evaluation, single-canvas training."""
    gr.Markdown("## 7. Analysis (asks this tab's model; only single-canvas training changes it)",
                elem_classes=["section-title"])
    frame = gr.Number(value=1, precision=0, label="Frame t of the loaded session (follows the frame slider)",
                      elem_id="analysis-frame")
    gr.Markdown("### What if the other action had been taken?")
    cf_btn = gr.Button("Compare actions at frame t", elem_id="cf-btn")
    with gr.Row():
        cf_pictures = [_image(f"Frame t+1 if {ACTION_NAMES.get(a, a)}", f"cf-{a}", FRAME_HEIGHT) for a in ACTIONS]
        cf_actual = _image("Actual frame t+1", "cf-actual", FRAME_HEIGHT)
    cf_md = gr.Markdown(elem_id="cf-info")
    gr.Markdown("### Open-loop rollout: how fast do errors compound?")
    with gr.Row():
        rollout_k = gr.Number(value=APP.default_rollout_steps, precision=0, elem_id="rollout-k",
                              label=f"Steps k (1-{APP.max_rollout_steps})")
        rollout_btn = gr.Button("Roll out from frame t", elem_id="rollout-btn")
    rollout_image = _image("Open-loop rollout", "rollout-image", CANVAS_HEIGHT * 2)
    rollout_table = gr.Dataframe(label="Per step", elem_id="rollout-table", interactive=False, wrap=True)
    rollout_md = gr.Markdown(elem_id="rollout-info")
    return {"analysis_frame": frame, "cf_btn": cf_btn, "cf_pictures": cf_pictures, "cf_actual": cf_actual, "cf_md": cf_md,
            "rollout_k": rollout_k, "rollout_btn": rollout_btn, "rollout_image": rollout_image,
            "rollout_table": rollout_table, "rollout_md": rollout_md, **_evaluation_block(), **_canvas_block()}


def _evaluation_block() -> dict[str, Any]:
    gr.Markdown("### Whole-session evaluation (every transition, no training)")
    with gr.Row():
        eval_session = gr.Dropdown(label="Session to evaluate", choices=[], allow_custom_value=True,
                                   elem_id="eval-session", scale=3)
        eval_btn = gr.Button("Evaluate session", elem_id="eval-btn", scale=1)
    eval_md = gr.Markdown(elem_id="eval-info")
    eval_plot = gr.ScatterPlot(pd.DataFrame({"frame": [np.nan] * 3, "MSE": [np.nan] * 3, "series": list(EVALUATION_COLOURS)}),
                               x="frame", y="MSE", color="series", color_map=EVALUATION_COLOURS, elem_id="eval-plot",
                               title="Prediction error per transition (frame t -> t+1)", x_title="frame t",
                               y_title="MSE", height=300, show_label=False, label="Prediction error per transition",
                               buttons=["fullscreen", "export"])
    return {"eval_session": eval_session, "eval_btn": eval_btn, "eval_md": eval_md, "eval_plot": eval_plot}


def _canvas_block() -> dict[str, Any]:
    gr.Markdown(f"### Train on a single canvas: can the model fit one example?\n**This trains this tab's model**: "
                f"1-{APP.max_canvas_steps} optimizer steps on the canvas ending at frame t alone (no replayed canvases); "
                "the training views above follow it, Stop ends it, and the model is saved like after a run.")
    with gr.Row():
        canvas_steps = gr.Number(value=APP.default_canvas_steps, precision=0, elem_id="canvas-steps",
                                 label=f"Steps (1-{APP.max_canvas_steps})")
        canvas_btn = gr.Button("Train on the canvas ending at frame t", variant="stop", elem_id="canvas-btn")
    canvas_progress = gr.Markdown(elem_id="canvas-progress")
    canvas_plot = _plot("Single-canvas training loss", "canvas-plot", "loss", LOSS_COLOURS, x_title="step of this training")
    gr.Markdown("Red: the optimised, dot-weighted loss; orange: the plain masked-patch MSE of that canvas.",
                elem_id="canvas-legend")
    return {"canvas_steps": canvas_steps, "canvas_btn": canvas_btn, "canvas_progress": canvas_progress,
            "canvas_plot": canvas_plot}


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
    canvas_event = _wire_analysis(demo, user, c)
    _wire_workflow(demo, user, c, run_event)
    c["stop_btn"].click(stop_run, [user], run_outputs, api_name="stop", cancels=[run_event, canvas_event],
                        concurrency_limit=None, show_progress="hidden")
    controls = [c["quantile"], *c["layer_boxes"], *c["head_boxes"], c["aggregation"], c["viz_type"]]
    gr.on([control.change for control in controls], update_attention_viz, [*controls, user],
          [c["attn_image"], c["attn_stats"]], api_name="update_attention_viz", preprocess=False,
          trigger_mode="always_last", concurrency_limit=None, show_progress="hidden")


def _record_block() -> dict[str, Any]:
    gr.Markdown("### Record a session (the same code as `record_session.py`; a new folder every time)")
    with gr.Row():
        pattern = gr.Dropdown(list(PATTERN_NAMES), value="random", label="Pattern", elem_id="record-pattern")
        steps = gr.Number(value=200, precision=0, label=f"Steps (3-{APP.max_record_steps:,})", elem_id="record-steps")
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="record-seed")
        radius = gr.Number(value=5, precision=0, label="Dot radius (1-50 px)", elem_id="record-radius")
        move = gr.Number(value=27, precision=0, label="Move (0-223 px)", elem_id="record-move")
        record_btn = gr.Button("Record session", elem_id="record-btn")
    record_md = gr.Markdown(elem_id="record-info")
    return {"record_pattern": pattern, "record_steps": steps, "record_seed": seed, "record_radius": radius,
            "record_move": move, "record_btn": record_btn, "record_md": record_md}


def _history_block() -> dict[str, Any]:
    gr.Markdown("### Run history: what the model predicted at earlier iterations")
    with gr.Row():
        history_slider = gr.Slider(0, 1, value=0, step=1, label="Run history: iteration", interactive=False,
                                   elem_id="history-slider", scale=4)
        play_btn = gr.Button("▶ Play", elem_id="history-play-btn", scale=1)
        pause_btn = gr.Button("❚❚ Pause", elem_id="history-pause-btn", scale=1)
    with gr.Row():
        history_current = _image("Frame t (2x)", "history-current", FRAME_HEIGHT)
        history_predicted = _image("Predicted frame t+1 (2x)", "history-predicted", FRAME_HEIGHT)
        history_error = _image("Its error (amplified)", "history-error", FRAME_HEIGHT)
    history_md = gr.Markdown(elem_id="history-info")
    return {"history_slider": history_slider, "play_btn": play_btn, "pause_btn": pause_btn,
            "history_current": history_current, "history_predicted": history_predicted, "history_error": history_error,
            "history_md": history_md}


def _workflow_section() -> dict[str, Any]:
    """Section 8: run history, named checkpoints and reset."""
    gr.Markdown("## 8. Your work: run history, named checkpoints and reset", elem_classes=["section-title"])
    record = _record_block()
    history = _history_block()
    gr.Markdown("### Checkpoints")
    gr.Markdown("Every run saves this tab's model to the shared `autoencoder.pth` (the last tab to finish wins). "
                "Save a named copy to keep a model; load one into this tab to go on from it.")
    with gr.Row():
        ckpt_name = gr.Textbox(label="Name for this tab's model", placeholder="e.g. alternate-600", elem_id="ckpt-name",
                               scale=2)
        ckpt_save = gr.Button("Save checkpoint", elem_id="ckpt-save-btn", scale=1)
    with gr.Row():
        ckpt_choice = gr.Dropdown(label="Saved checkpoint", choices=[], allow_custom_value=True, elem_id="ckpt-choice",
                                  scale=2)
        ckpt_load = gr.Button("Load into this tab", elem_id="ckpt-load-btn", scale=1)
        reset_btn = gr.Button("Reset to a fresh model", variant="stop", elem_id="reset-btn", scale=1)
    ckpt_md = gr.Markdown(elem_id="ckpt-info")
    gr.Markdown("### Export")
    with gr.Row():
        export_btn = gr.Button("Export views, metrics and settings (zip)", elem_id="export-btn", scale=1)
        export_file = gr.File(label="Export", elem_id="export-file", interactive=False, scale=2)
    return {"export_btn": export_btn, "export_file": export_file, "ckpt_name": ckpt_name, "ckpt_save": ckpt_save, "ckpt_choice": ckpt_choice, "ckpt_load": ckpt_load,
            "reset_btn": reset_btn, "ckpt_md": ckpt_md, **history, **record}


def _wire_workflow(demo: gr.Blocks, user: gr.State, c: dict[str, Any], run_event) -> None:
    """Connect section 8 (the checkpoint list is reread when the page opens and after every run's save)."""
    listing = [c["ckpt_md"], c["ckpt_choice"]]
    demo.load(list_checkpoints, [user], listing, api_visibility="private")
    run_event.then(list_checkpoints, [user], listing, api_visibility="private")
    c["ckpt_save"].click(save_checkpoint, [c["ckpt_name"], user], listing, api_name="save_checkpoint", preprocess=False)
    run_outputs = [c[key] for key in RUN_OUTPUT_KEYS]
    c["ckpt_load"].click(load_checkpoint, [c["ckpt_choice"], user], [c["ckpt_md"], *run_outputs],
                         api_name="load_checkpoint", preprocess=False, concurrency_id="model", concurrency_limit=4)
    c["reset_btn"].click(reset_model, [user], [c["ckpt_md"], *run_outputs], api_name="reset_model", preprocess=False,
                         concurrency_id="model", concurrency_limit=4)
    shown = [c["history_current"], c["history_predicted"], c["history_error"], c["history_md"]]
    c["history_slider"].release(browse_history, [c["history_slider"], user], shown, api_name="browse_history",
                                preprocess=False, trigger_mode="always_last", concurrency_limit=None,
                                show_progress="hidden")
    play = c["play_btn"].click(play_history, [c["history_slider"], user], [c["history_slider"], *shown],
                               api_visibility="private", preprocess=False, show_progress="hidden")
    c["pause_btn"].click(None, None, None, cancels=[play], api_visibility="private")
    c["export_btn"].click(export_results, [user], [c["export_file"]], api_name="export", preprocess=False)
    record_inputs = [c[k] for k in ("record_pattern", "record_steps", "record_seed", "record_radius", "record_move")]
    c["record_btn"].click(record_new_session, record_inputs, [c["record_md"], c["session_dropdown"], c["eval_session"]],
                          api_name="record_session", preprocess=False, concurrency_id="record", concurrency_limit=2,
                          show_progress="minimal", show_progress_on=[c["record_md"]])


def _wire_analysis(demo: gr.Blocks, user: gr.State, c: dict[str, Any]):
    """Connect section 7 and the patch attention controls; returns the single-canvas training event
    (Stop cancels it like a run)."""
    # the analysis frame follows the slider in the browser (no server call, /update_frame unchanged)
    c["frame_slider"].change(None, [c["frame_slider"]], [c["analysis_frame"]], js="(v) => v", api_visibility="private")
    gr.on([demo.load, c["refresh_btn"].click], session_names, None, [c["eval_session"]], api_visibility="private")
    frame = c["analysis_frame"]
    quick = dict(preprocess=False, concurrency_id="analysis", concurrency_limit=2)
    c["cf_btn"].click(counterfactual, [frame, user], [*c["cf_pictures"], c["cf_actual"], c["cf_md"]],
                      api_name="counterfactual", **quick)
    c["rollout_btn"].click(rollout, [frame, c["rollout_k"], user], [c["rollout_image"], c["rollout_table"], c["rollout_md"]],
                           api_name="rollout", **quick)
    c["eval_btn"].click(evaluate_session, [c["eval_session"], user], [c["eval_md"], c["eval_plot"]],
                        api_name="evaluate_session", **quick)
    patch_outputs = [c["patch_image"], c["patch_md"]]
    c["patch_btn"].click(patch_attention, [c["patch_row"], c["patch_col"], user], [*patch_outputs, c["attn_picker"]],
                         api_name="patch_attention", **quick)
    c["attn_picker"].select(pick_patch, [user], [c["patch_row"], c["patch_col"], c["attn_picker"], *patch_outputs],
                            api_visibility="private", **quick)
    return c["canvas_btn"].click(train_single_canvas, [frame, c["canvas_steps"], user],
                                 [user, *(c[key] for key in CANVAS_OUTPUT_KEYS)], api_name="train_single_canvas",
                                 preprocess=False, concurrency_id="model", concurrency_limit=4, show_progress="minimal",
                                 show_progress_on=[c["canvas_progress"]])


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

        c = {**_session_section(), **_run_section(), **_views_sections(), **_metrics_section(config),
             **_attention_section(config), **_analysis_section(), **_workflow_section()}
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
