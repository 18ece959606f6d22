"""What the page shows of a tab's model, rewritten by every section that changes the model.

A run (section 2), single-canvas training (section 7), loading a checkpoint and resetting the model (section 8)
all end by rewriting the same outputs: the progress and checkpoint status (section 2), the training views (3),
the prediction views (4), the metric graphs (5), the decoder attention picture and patch picker (6) and the
run-history slider (8). Their values are built here from the tab's ``RunController``, in ``RUN_OUTPUT_KEYS``
order; the section modules import them. Of the page modules it imports only ``page_common``.
"""

from __future__ import annotations

import math

import gradio as gr
import numpy as np
import pandas as pd

from attention_draw import draw_attention, patch_picker_image, render_patch_attention
from frame_metrics import WITHIN_PX, dot_found_shares, latest_dot_hits
from run_controller import RunController, RunStatus
from page_common import (
    APP,
    UserState,
    amplify_error,
    code_span,
    display_path,
    format_px,
    format_value,
    graph_updates,
    hide_paths,
    refusal,
    series_anchors,
    upscale,
)
from session_explorer_lib import markdown_escape

# -----------------------------------------------------------------------------
# constants

MAX_PLOT_POINTS = 2000  # longer metric histories are thinned to this many points per series
MIN_ITERATION_SPAN = 10  # the iteration axis spans at least this many iterations, so its ticks are whole ones
NO_MODEL_YET = "_No model yet: it is created at the first Run (from the saved checkpoint when there is one)._"
NO_HISTORY = "No run history yet: run the world model; each run's iterations are kept here."
PICK_A_PATCH = "_Click a patch of the predicted frame (or enter its row and column) to see where it looks._"
NOTHING_RUN_YET = "_Nothing to show yet: run the world model once; its decoder attention is captured at the end of every run._"

# the components every run update writes, in order (see display_outputs)
RUN_OUTPUT_KEYS = (
    "progress", "checkpoint", "train_original", "train_masked", "train_inpainting", "train_composite",
    "pred_current", "pred_next", "pred_error", "prediction_info", "plot_error", "plot_time", "plot_loss",
    "plot_dot", "attn_image", "attn_stats", "frame_slider", "pred_canvas", "plot_lr", "plot_grad", "attn_picker",
    "history_slider", "history_current", "history_predicted", "history_error", "history_md", "patch_image", "patch_md",
)
PICKER_SCALE = 2  # the clickable picture of the predicted frame is shown at this enlargement
TRAIN_VIEW_KEYS = ("train_original", "train_masked", "train_inpainting", "train_composite")
PREDICTION_KEYS = ("pred_current", "pred_next", "pred_error", "prediction_info", "pred_canvas")
HISTORY_KEYS = ("history_current", "history_predicted", "history_error", "history_md")  # section 8's run history
PATCH_KEYS = ("patch_image", "patch_md")  # section 6's one patch
PLOT_KEYS = ("plot_error", "plot_time", "plot_loss", "plot_dot", "plot_lr", "plot_grad")  # metric_frames order
CLIP_SHOWN_FROM = 0.5  # the gradient graph draws the clip threshold once a norm reaches this share of it
LOOP_MARKS = 24  # the graphs mark at most this many replay loops (the latest)

# series names (shown in the graphs' tooltips) and colours; a graph draws its series in its colour map's order
SERIES_LOOP = "replay looped to frame 0"  # a vertical mark between the session's last frame and its first
SERIES_SPAN = "axis span"  # one invisible point that keeps a short history's iteration axis 10 wide
SERIES_PREDICTION, SERIES_BASELINE = "model prediction", "baseline: repeat last frame"  # one point per prediction
SERIES_PREDICTION_MEAN = f"model prediction, mean of the last {APP.error_window}"
SERIES_BASELINE_MEAN = f"baseline, mean of the last {APP.error_window}"
SERIES_LOSS, SERIES_MSE = "training loss (weighted)", "masked-patch MSE"
SERIES_GRAD, SERIES_CLIP = "gradient norm (before clipping)", "clip threshold"
SERIES_TIME, SERIES_DOT, SERIES_LR = "iteration time", "within 3 px", "learning rate"
LOOP_COLOUR, LINE_COLOUR = "#d946ef", "#4f46e5"


def graph_colours(series: dict[str, str], loops: bool = True) -> dict[str, str]:
    """A graph's colour map, in drawing order: the replay-loop marks (underneath everything), the
    invisible axis-span point, then ``series``. Every name a graph may draw must be here (Gradio
    gives a name outside its colour map no colour)."""
    marks = {f"{SERIES_LOOP} ({k})": LOOP_COLOUR for k in range(1, LOOP_MARKS + 1)} if loops else {}
    return {**marks, SERIES_SPAN: "transparent", **series}


# faint: every prediction (on an alternating session the baseline jumps between 0 and its full error
# every iteration); strong, drawn over them: their rolling means, so both lines can be read
ERROR_COLOURS = graph_colours({SERIES_BASELINE: "#d1d5db", SERIES_PREDICTION: "#c7d2fe",
                               SERIES_BASELINE_MEAN: "#4b5563", SERIES_PREDICTION_MEAN: LINE_COLOUR})
LOSS_COLOURS = graph_colours({SERIES_LOSS: "#dc2626", SERIES_MSE: "#f59e0b"})
CANVAS_LOSS_COLOURS = graph_colours({SERIES_LOSS: "#dc2626", SERIES_MSE: "#f59e0b"}, loops=False)
GRAD_COLOURS = graph_colours({SERIES_GRAD: "#0d9488", SERIES_CLIP: "#9ca3af"})
TIME_COLOURS, DOT_COLOURS, LR_COLOURS = (graph_colours({name: LINE_COLOUR}) for name in (SERIES_TIME, SERIES_DOT, SERIES_LR))


# -----------------------------------------------------------------------------
# metric graphs (section 5)


def _series(rows: list[dict], key: str, label: str, scale: float = 1.0) -> pd.DataFrame:
    points = [(r["iteration"], r[key] * scale) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    if len(points) > MAX_PLOT_POINTS:  # thin evenly, always keeping the first and the latest point
        keep = np.unique(np.linspace(0, len(points) - 1, MAX_PLOT_POINTS).round().astype(int))
        points = [points[i] for i in keep]
    return pd.DataFrame({"iteration": np.array([p[0] for p in points], dtype=np.float64),
                         "value": np.array([p[1] for p in points], dtype=np.float64),
                         "series": [label] * len(points)})


def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start). (n,) -> (n,)"""
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])  # (n+1,)
    n = np.arange(1, len(values) + 1)
    return (csum[n] - csum[np.maximum(n - window, 0)]) / np.minimum(n, window)


def rolling_rows(history: list[dict], key: str, window: int) -> list[dict]:
    """Per iteration that has a finite ``key``, the mean of it over the last ``window`` such iterations."""
    rows = [r for r in history if r.get(key) is not None and math.isfinite(r[key])]
    means = _rolling_mean(np.array([r[key] for r in rows], dtype=np.float64), window)
    return [{"iteration": r["iteration"], key: float(m)} for r, m in zip(rows, means)]


def dot_found_rows(history: list[dict], window: int) -> list[dict]:
    """Per scored prediction, the share (%) of the last ``window`` predictions whose dot landed within
    3 px of the true one (no predicted dot counts as a miss): the moment the model finds the dot."""
    scored = [r for r in history if r.get("dot_error") is not None]
    share = 100.0 * dot_found_shares([r["dot_error"] for r in scored], window)  # (n,)
    return [{"iteration": r["iteration"], "within_3px_share": float(v)} for r, v in zip(scored, share)]


def loop_marks(history: list[dict], low: float, high: float) -> pd.DataFrame:
    """A vertical line from ``low`` to ``high`` halfway between the iteration that saw a session's last
    frame and the next one (frame 0 again), for the latest ``LOOP_MARKS`` replay loops: there the next
    two iterations have no prediction to score and the first does not train."""
    looped = [r["iteration"] + 0.5 for r in history if r.get("replay_looped")][-LOOP_MARKS:]
    return pd.DataFrame({"iteration": np.repeat(np.array(looped, dtype=np.float64), 2),
                         "value": np.tile([low, high], len(looped)).astype(np.float64),
                         "series": [f"{SERIES_LOOP} ({k})" for k in range(1, len(looped) + 1) for _ in (low, high)]})


def span_point(data: pd.DataFrame) -> pd.DataFrame:
    """An invisible point that widens a history shorter than ``MIN_ITERATION_SPAN`` iterations to that
    span (Gradio exposes no tick step: a shorter axis gets ticks between whole iterations, labelled
    1, 2, 2 by the "d" format). A graph never sets ``x_lim`` instead: the browser redraws a graph whose
    ``x_lim`` and data change together with the old data."""
    drawn = data.dropna()
    if drawn.empty or drawn["iteration"].max() - drawn["iteration"].min() >= MIN_ITERATION_SPAN - 1:
        return data.iloc[:0]
    first = drawn.iloc[0]
    return pd.DataFrame({"iteration": [first["iteration"] + MIN_ITERATION_SPAN - 1], "value": [first["value"]],
                         "series": [SERIES_SPAN]})


def graph(colours: dict[str, str], parts: list[pd.DataFrame], history: list[dict] | None = None,
          y_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """One graph's long-format data: a null anchor row per name in ``colours`` (see
    ``series_anchors``), the replay-loop marks of ``history`` (spanning ``y_range``, by default the
    drawn values), the axis-span point and the ``parts``."""
    data = pd.concat(parts, ignore_index=True)
    marks = []
    if history and not data.empty:
        low, high = y_range or (float(data["value"].min()), float(data["value"].max()))
        marks = [loop_marks(history, low, high)]
    return pd.concat([series_anchors(colours), *marks, span_point(data), data], ignore_index=True)


def two_series(rows: list[dict], colours: dict[str, str], keys: tuple[str, str],
               history: list[dict] | None = None) -> pd.DataFrame:
    """A graph of two metrics of ``rows``, named after the last two entries of ``colours`` (with the
    replay loops of ``history`` marked)."""
    (first, second), (a, b) = list(colours)[-2:], keys
    return graph(colours, [_series(rows, a, first), _series(rows, b, second)], history)


def metric_frames(history: list[dict], grad_clip: float = 0.0) -> tuple[pd.DataFrame, ...]:
    """Long-format DataFrames for the graphs, in ``PLOT_KEYS`` order: prediction error (every prediction
    faint, the rolling means strong), iteration time, training loss, the rolling share of predictions
    that put the dot within 3 px, learning rate and gradient norm (with the clip threshold as a flat
    line when clipping is on); each marks where the replay looped to the session's first frame."""
    window = APP.error_window
    error = graph(ERROR_COLOURS, [
        _series(history, "copy_error", SERIES_BASELINE), _series(history, "prediction_error", SERIES_PREDICTION),
        _series(rolling_rows(history, "copy_error", window), "copy_error", SERIES_BASELINE_MEAN),
        _series(rolling_rows(history, "prediction_error", window), "prediction_error", SERIES_PREDICTION_MEAN)],
        history)
    timing = graph(TIME_COLOURS, [_series(history, "iteration_time", SERIES_TIME, scale=1000.0)], history)
    loss = two_series(history, LOSS_COLOURS, ("training_loss", "training_mse"), history=history)
    dot = graph(DOT_COLOURS, [_series(dot_found_rows(history, APP.dot_window), "within_3px_share", SERIES_DOT)],
                history, y_range=(0.0, 100.0))
    lr = graph(LR_COLOURS, [_series(history, "lr", SERIES_LR)], history)
    norms = [r for r in history if r.get("grad_norm") is not None]
    # the threshold is drawn once norms come near it: far above them it would flatten their line
    near = grad_clip and norms and max(r["grad_norm"] for r in norms) >= CLIP_SHOWN_FROM * grad_clip
    clip = [{"iteration": r["iteration"], "clip": grad_clip} for r in (norms[0], norms[-1])] if near else []
    grad = graph(GRAD_COLOURS, [_series(norms, "grad_norm", SERIES_GRAD), _series(clip, "clip", SERIES_CLIP)], history)
    return error, timing, loss, dot, lr, grad


# -----------------------------------------------------------------------------
# what a run shows


def checkpoint_markdown(c: RunController) -> str:
    """Which checkpoint the tab's model came from and where it was last saved."""
    origin, saved = c.origin, c.saved
    if origin is None:
        return NO_MODEL_YET
    shown = f"`{display_path(origin.path)}`"
    if origin.kind == "loaded":
        parts = [f"**Checkpoint:** loaded {shown} at step {origin.step} (iteration {origin.iteration}){origin.note}."]
    elif origin.kind == "reset":
        parts = [f"**Model reset:** a fresh, untrained model; its first run saves to {shown} as usual."]
    elif origin.kind == "lost":
        parts = [lost_model_markdown(c) + f" Its first run saves to {shown} as usual."]
    elif origin.kind == "refused":
        parts = [f"**Checkpoint refused:** {markdown_escape(hide_paths(origin.reason))}. Training a fresh model "
                 "instead; the refused file is kept beside it under a new name when this model first saves."]
    else:
        parts = [f"**Checkpoint:** none found at {shown}; training a fresh model."]
    if saved is not None and saved.ok:
        text = f"**Saved** to `{display_path(saved.path)}` after the last run: step {saved.step}, iteration {saved.iteration}."
        if saved.set_aside:
            text += f" The refused file was kept as {code_span(saved.set_aside)}."
        elif saved.reason:
            text += f" ({markdown_escape(saved.reason)}.)"
        parts.append(text)
    elif saved is not None:
        parts.append(f"**Checkpoint not saved:** {markdown_escape(hide_paths(saved.reason))}")
    if c.shared_checkpoint_replaced():
        parts.append(f"**Note:** another tab saved {shown} after this tab last loaded or saved it; this tab's next "
                     "run will save over it. Save a named checkpoint (section 8) to keep both.")
    return "\n\n".join(parts)


def lost_model_markdown(c: RunController) -> str:
    """What the tab is told while its model descends from one made after its parked model was lost
    (``origin.kind == "lost"``): in words, no path; it stays until a checkpoint is loaded or the model reset."""
    return (f"**This tab's model was lost:** {markdown_escape(c.origin.reason)}. A fresh, untrained model took its "
            "place (not the shared checkpoint, which may hold another tab's model), and this tab's run history "
            "was lost with it.")


def progress_markdown(status: RunStatus, dot: tuple[int, int] | None = None) -> str:
    """Progress k/N with the latest prediction error, iteration time and loss, the model's counters and,
    given ``dot`` (hits, scored: ``latest_dot_hits``), how many of the latest predictions found the dot,
    so that the moment it is found shows within a second, not with the next redraw of the graphs."""
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
        f"**prediction error (MSE):** {format_value(last.get('prediction_error'))} | "
        f"**dot error:** {format_px(last.get('dot_error'))} | "
        f"**iteration time:** {format_value(time_ms, 4)} ms | **training loss:** {format_value(last.get('training_loss'))} | "
        f"model step {step}, iteration {iteration}"
    )
    if dot is not None:
        hits, scored = dot
        text += f" | **dot found:** {hits} of the {'last' if scored == APP.dot_window else 'first'} {scored} within {WITHIN_PX:g} px"
    if status.problem and status.state != "running":
        text += f"\n\n**Run stopped early:** {markdown_escape(hide_paths(status.problem))}"
    return text


def prediction_outputs(views: dict | None) -> tuple:
    """Current frame, predicted next frame, amplified error map, a summary (the error's MSE and
    amplification) and the prediction canvas (``PREDICTION_KEYS`` order).

    Only values change, never a component's label or other settings: Gradio rebuilds a component's
    settings and API description for every update that changes one (about 15 ms of the server's
    time each, with every update of a run, taken from the training on a small machine)."""
    views = views or {"current": None, "predicted": None, "error": None, "error_mse": None, "canvas": None}
    error, gain = amplify_error(views["error"])
    mse = views["error_mse"]
    info = (
        f"**Prediction error of the current frame (MSE):** {format_value(mse)}. The error map compares the prediction "
        f"made one iteration earlier with the frame that then arrived; it is amplified x{gain:.1f} so faint "
        "differences show. _Predicted next frame_ is the model's guess for the frame after the current one."
    )
    return upscale(views["current"]), upscale(views["predicted"]), upscale(error), info, views["canvas"]


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
        raise refusal(f"Cannot draw the attention: {e}") from None
    iteration, step = c.attention_at
    return image, f"_Decoder attention captured after iteration {iteration} (model step {step})._\n\n{summary}"


def attention_picker(user: UserState, selected: tuple[int, int] | None = None) -> np.ndarray | None:
    """The predicted frame of the attention capture, enlarged with its patch grid (the ``selected``
    patch ringed): click a patch."""
    attention = user.controller.attention
    if attention is None or attention.prediction is None:
        return None
    return patch_picker_image(attention.prediction, attention.patch_size, PICKER_SCALE, selected)


def patch_outputs(user: UserState, row: int, col: int) -> tuple[np.ndarray, str]:
    """Where patch (``row``, ``col``) of the predicted frame looks, with section 6's layers, heads and
    aggregation: one canvas per layer and its strongest sources (``PATCH_KEYS`` order)."""
    attention = user.controller.attention
    if attention is None:
        raise refusal("Run the world model first: patch attention reads the decoder attention captured at the end of a run.")
    _, layers, heads, aggregation, _ = user.attention_controls
    if not layers or not heads:
        raise refusal("Select at least one decoder layer and one attention head in section 6.")
    try:
        image, _, text = render_patch_attention(attention, row, col, layers, heads, aggregation)
    except ValueError as e:
        raise refusal(f"Cannot draw the attention of patch ({row}, {col}): {e}") from None
    return image, text


def chosen_patch_outputs(user: UserState) -> tuple[np.ndarray | None, str]:
    """The tab's chosen patch redrawn from the latest attention capture, or nothing when no patch was
    chosen or there is no capture to draw it from (``PATCH_KEYS`` order)."""
    _, layers, heads, _, _ = user.attention_controls
    if user.selected_patch is None or user.controller.attention is None or not layers or not heads:
        return None, PICK_A_PATCH
    return patch_outputs(user, *user.selected_patch)


def history_outputs(c: RunController, iteration: int) -> tuple:
    """[frame t, predicted frame t+1, error map, metrics] of the kept iteration nearest ``iteration``
    (``HISTORY_KEYS`` order)."""
    snap = c.snapshots.nearest(iteration)
    if snap is None:
        raise refusal(NO_HISTORY)
    error, gain = amplify_error(snap.error)
    m = snap.metrics
    text = (f"**Iteration {snap.iteration}**" + (f" (the kept one nearest {iteration})" if snap.iteration != iteration else "")
            + f" | prediction error (MSE): {format_value(snap.error_mse)} | dot error: {format_px(m.get('dot_error'))} | training loss: "
            f"{format_value(m.get('training_loss'))} | learning rate: {format_value(m.get('lr'), 3)} | gradient norm: "
            f"{format_value(m.get('grad_norm'), 3)} | model step {m.get('step')}. The error map (x{gain:.1f}) compares the prediction made one iteration "
            "earlier with this frame.")
    return upscale(snap.current), upscale(snap.predicted), upscale(error), text


def latest_history_outputs(c: RunController) -> tuple:
    """The run history's latest kept iteration (where ``history_slider`` puts the slider), or nothing."""
    kept = c.snapshots.iterations
    return history_outputs(c, kept[-1]) if kept else (None, None, None, f"_{NO_HISTORY}_")


def training_view_outputs(c: RunController) -> tuple:
    """The four training views, ``TRAIN_VIEW_KEYS`` order (None before the first training step)."""
    train = c.training_views() or {}
    return tuple(train.get(k) for k in ("original", "masked", "inpainting", "composite"))


def display_outputs(user: UserState, final: bool, first: bool = False, views: bool = True) -> tuple:
    """Values for RUN_OUTPUT_KEYS; while running, the slow-changing outputs are skipped, and with
    ``views`` False also the training views, the prediction canvas and the graphs (what costs the
    most to make, send and draw in the browser; the progress and the predicted frame are always
    redrawn)."""
    c = user.controller
    out = dict.fromkeys(RUN_OUTPUT_KEYS, gr.skip())
    out["progress"] = progress_markdown(c.status(), latest_dot_hits(c.history, APP.dot_window))
    if final or first or not c.has_model:
        out["checkpoint"] = checkpoint_markdown(c)
    if not c.has_model:
        return tuple(out[k] for k in RUN_OUTPUT_KEYS)
    views = views or final or first
    if views:
        out.update(zip(TRAIN_VIEW_KEYS, training_view_outputs(c)))
    out.update((k, v) for k, v in zip(PREDICTION_KEYS, prediction_outputs(c.prediction_views(canvas=views)))
               if views or k != "pred_canvas")
    if views:
        out.update(zip(PLOT_KEYS, graph_updates(user, metric_frames(list(c.history), c.config.grad_clip))))  # a copy: a run may append
    if final:
        out["attn_image"], out["attn_stats"] = attention_outputs(user)
        out["attn_picker"] = attention_picker(user, user.selected_patch)
        out.update(zip(PATCH_KEYS, chosen_patch_outputs(user)))
        out["frame_slider"] = gr.Slider(value=c.start_frame)
        out["history_slider"] = history_slider(c)  # and the pictures of the iteration it is set to
        out.update(zip(HISTORY_KEYS, latest_history_outputs(c)))
    return tuple(out[k] for k in RUN_OUTPUT_KEYS)


def history_slider(c: RunController) -> gr.Slider:
    """The run-history slider over the kept iterations, at the latest."""
    kept = c.snapshots.iterations
    if not kept:
        return gr.Slider(minimum=0, maximum=1, value=0, interactive=False)
    return gr.Slider(minimum=kept[0], maximum=max(kept[-1], kept[0] + 1), value=kept[-1], step=1, interactive=True,
                     label=f"Run history: iteration ({len(kept)} kept, " + (
                         "every iteration)" if c.snapshots.stride == 1 else f"every {c.snapshots.stride}th iteration)"))
