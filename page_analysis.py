"""Section 7 of the page, "Analysis": questions to this tab's model (counterfactual actions, open-loop
rollouts, whole-session evaluation), which never train it, and single-canvas training, which does.

Endpoints: ``/counterfactual``, ``/rollout``, ``/evaluate_session`` and ``/train_single_canvas`` (a generator).
"""

from __future__ import annotations

import math
import time
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from run_controller import RunBusyError, RunController
from page_common import (
    APP,
    CANVAS_HEIGHT,
    FRAME_HEIGHT,
    X_LABEL_ANGLE,
    UserState,
    amplify_error,
    format_px,
    format_value,
    graph_updates,
    hide_paths,
    image_block,
    line_plot,
    open_session,
    refusal,
    require_session,
    session_folder,
    upscale,
    validated,
    whole_number,
)
from images import panel_grid
from page_outputs import (
    CANVAS_LOSS_COLOURS,
    PATCH_KEYS,
    TRAIN_VIEW_KEYS,
    attention_outputs,
    attention_picker,
    checkpoint_markdown,
    chosen_patch_outputs,
    lost_model_markdown,
    training_view_outputs,
    two_series,
)
from session_explorer_lib import ACTION_NAMES, SessionError, markdown_escape, scan_sessions
from world_model_analysis import ACTIONS, Evaluation, prediction_frames

# -----------------------------------------------------------------------------
# constants

# what single-canvas training writes: its progress and loss curve, the four training views, then (at the end)
# the checkpoint status and the attention outputs, recaptured from the changed model
CANVAS_OUTPUT_KEYS = ("canvas_progress", "canvas_plot", "train_original", "train_masked", "train_inpainting",
                      "train_composite", "checkpoint", "attn_image", "attn_stats", "attn_picker", *PATCH_KEYS)
SERIES_STAY, SERIES_MOVE, SERIES_REPEAT = "model, after stay", "model, after move", "baseline: repeat frame t"
EVAL_PLOT_HEIGHT = 300  # CSS pixels
EVALUATION_COLOURS = {SERIES_STAY: "#dc2626", SERIES_MOVE: "#16a34a", SERIES_REPEAT: "#9ca3af"}


# -----------------------------------------------------------------------------
# pictures and text


def _dot(value: float) -> str:
    """A dot error from an analysis: NaN means the actual frame has no dot to compare with."""
    return "no dot in the actual frame" if value is not None and math.isnan(value) else format_px(value)


def _share(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.0f} %"


def _model_line(step: int | None, iteration: int | None) -> str:
    return f"model step {step}, iteration {iteration}" + (" (untrained)" if step == 0 else "")


def _model_now(c: RunController) -> str:
    status = c.status()
    return _model_line(status.model_step, status.model_iteration)


def _with_notice(outputs: tuple, c: RunController) -> tuple:
    """``outputs`` whose last one (the markdown) begins with what the tab must be told about its model:
    that it was lost while parked and a fresh one answers (in words; until a load or reset)."""
    if c.origin is None or c.origin.kind != "lost":
        return outputs
    return (*outputs[:-1], f"{lost_model_markdown(c)}\n\n{outputs[-1]}")


def counterfactual_outputs(cf, model_line: str) -> tuple:
    """[one picture per action (the recorded one named in its label), the actual frame, markdown]."""
    name = {a: ACTION_NAMES.get(a, str(a)) for a in cf.actions}
    pictures = tuple(gr.update(value=upscale(cf.predictions[i]),
                               label=f"Frame {cf.frame_index + 1} if {name[a]}"
                                     + (" (recorded)" if a == cf.recorded_action else ""))
                     for i, a in enumerate(cf.actions))
    rows = [f"| {name[a]}{' (recorded)' if a == cf.recorded_action else ''} | {format_value(cf.mse[i])} | {_dot(cf.dot_error[i])} |"
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
    return panel_grid([*actual, *predicted, *error], columns=len(actual), gap=gap), gain


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
            f"history ({model_line}). MSE goes {format_value(ro.mse[0])} -> {format_value(ro.mse[-1])}; the model beats repeating "
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
        rows.append(f"| {title} | {m['n']} | {format_value(m['prediction_mse'])} | {format_value(m['copy_mse'])} | "
                    f"{format_value(m['mse_ratio'], 3)} | {_share(m['dot_present'])} | {_share(m['within_3px'])} | "
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


# -----------------------------------------------------------------------------
# handlers


def _analysis_frame(frame_index: Any, user: UserState) -> int:
    """The analysis section's frame t, checked against the loaded session (t needs a frame before and after)."""
    session = require_session(user)
    try:
        first, last = prediction_frames(session, user.controller.config)
    except ValueError as e:
        raise refusal(str(e)) from None
    return whole_number(frame_index, "Frame index", first, last)


def check_frame_analysis(frame_index: Any, user: UserState) -> list[dict]:
    """Validator of ``counterfactual``: a frame t of the loaded session with a frame before and after it."""
    return validated(lambda: _analysis_frame(frame_index, user), None)


def counterfactual(frame_index: Any, user: UserState) -> tuple:
    """The model's frame t+1 under each action beside the recorded frame t+1 (never trains)."""
    t = _analysis_frame(frame_index, user)
    try:
        cf = user.controller.counterfactual(t)
    except (ValueError, SessionError) as e:
        raise refusal(f"Cannot compare actions at frame {t}: {hide_paths(e)}") from None
    return _with_notice(counterfactual_outputs(cf, _model_now(user.controller)), user.controller)


def _rollout_steps(k: Any) -> int:
    return whole_number(k, "Steps k", 1, APP.max_rollout_steps)


def check_rollout(frame_index: Any, k: Any, user: UserState) -> list[dict]:
    """Validator of ``rollout``: frame t and the number of steps, each under its own box."""
    return validated(lambda: _analysis_frame(frame_index, user), lambda: _rollout_steps(k), None)


def rollout(frame_index: Any, k: Any, user: UserState) -> tuple:
    """k open-loop steps from frame t with the recorded actions (never trains)."""
    t = _analysis_frame(frame_index, user)
    steps = _rollout_steps(k)
    try:
        ro = user.controller.rollout(t, steps, APP.max_rollout_steps)
    except (ValueError, SessionError) as e:
        raise refusal(f"Cannot roll out from frame {t}: {hide_paths(e)}") from None
    return _with_notice(rollout_outputs(ro, _model_now(user.controller)), user.controller)


def session_names() -> gr.Dropdown:
    """The loadable sessions, for the evaluation list (kept in step with the session list)."""
    names = [s.name for s in scan_sessions() if s.ok]
    return gr.Dropdown(choices=names, value=names[0] if names else None)


def check_evaluate_session(session_choice: Any, user: UserState) -> list[dict]:
    """Validator of ``evaluate_session``: a name of a folder in the sessions folder."""
    return validated(lambda: session_folder(session_choice), None)


def evaluate_session(session_choice: Any, user: UserState) -> tuple[str, pd.DataFrame]:
    """The tab's model on every transition of a session (any session; batched, never trains)."""
    session = open_session(session_choice)
    try:
        ev = user.controller.evaluate(session, APP.evaluation_batch)
    except (ValueError, SessionError) as e:
        raise refusal(f"Cannot evaluate session {session_choice}: {hide_paths(e)}") from None
    text, frame = evaluation_outputs(ev)
    return _with_notice((*graph_updates(user, [frame], height=EVAL_PLOT_HEIGHT), text), user.controller)[::-1]


def canvas_outputs(user: UserState, t: int, total: int, curve: list[dict], final: bool) -> tuple:
    """Values for CANVAS_OUTPUT_KEYS; the checkpoint and attention only at the end."""
    c = user.controller
    out = dict.fromkeys(CANVAS_OUTPUT_KEYS, gr.skip())
    last = curve[-1] if curve else {}
    state = "Done" if final and len(curve) == total else ("Stopped" if final else "Training")
    out["canvas_progress"] = (
        f"**{state}: {len(curve)}/{total}** steps on the canvas ending at frame {t} | masked MSE "
        f"{format_value(curve[0]['mse'] if curve else None)} -> {format_value(last.get('mse'))} | learning rate {format_value(last.get('lr'), 3)} | "
        f"gradient norm {format_value(last.get('grad_norm'), 3)} | model step {last.get('step', 'n/a')}")
    out["canvas_plot"], = graph_updates(user, [two_series(curve, CANVAS_LOSS_COLOURS, ("loss", "mse"))])
    out.update(zip(TRAIN_VIEW_KEYS, training_view_outputs(c)))
    if final:
        out["checkpoint"] = checkpoint_markdown(c)
        out["attn_image"], out["attn_stats"] = attention_outputs(user)
        out["attn_picker"] = attention_picker(user, user.selected_patch)
        out.update(zip(PATCH_KEYS, chosen_patch_outputs(user)))
    return tuple(out[k] for k in CANVAS_OUTPUT_KEYS)


def _canvas_frame(frame_index: Any, user: UserState) -> int:
    """Frame t whose training canvas (frames t-2, t-1, t) single-canvas training fits."""
    session = require_session(user)
    first = user.controller.config.canvas_history_size - 1
    return whole_number(frame_index, "Frame index", first, max(first, session.num_frames - 1))


def _canvas_steps(steps: Any) -> int:
    return whole_number(steps, "Steps", 1, APP.max_canvas_steps)


def check_train_single_canvas(frame_index: Any, steps: Any, user: UserState) -> list[dict]:
    """Validator of ``train_single_canvas``: frame t and the number of steps, each under its own box."""
    return validated(lambda: _canvas_frame(frame_index, user), lambda: _canvas_steps(steps), None)


def train_single_canvas(frame_index: Any, steps: Any, user: UserState):
    """Train this tab's model for ``steps`` (1-200) optimizer steps on the canvas ending at frame t
    alone, streaming the loss curve and the training views; saved like a run; Stop ends it."""
    t, total = _canvas_frame(frame_index, user), _canvas_steps(steps)
    try:
        work = user.controller.train_single_canvas(t, total)
    except (ValueError, SessionError) as e:
        raise refusal(f"Cannot train on the canvas ending at frame {t}: {hide_paths(e)}") from None
    curve, last_yield = [], -math.inf
    try:
        for step in work:
            if step is not None:
                curve.append({**step, "iteration": len(curve) + 1})
            if step is None or time.monotonic() - last_yield >= APP.update_interval_s:
                yield (user, *canvas_outputs(user, t, total, curve, final=False))
                last_yield = time.monotonic()
    except RunBusyError:
        raise refusal("A run is in progress in this tab: press Stop or wait for it to finish.") from None
    yield (user, *canvas_outputs(user, t, total, curve, final=True))


# -----------------------------------------------------------------------------
# layout


SECTION_TITLE = "7. Analysis, play and compare (asks the model; only single-canvas training changes it)"


def analysis_section() -> dict[str, Any]:
    """Section 7 (titled ``SECTION_TITLE`` by the fold the page puts it in): counterfactual actions,
    open-loop rollouts, whole-session evaluation, single-canvas training."""
    frame = gr.Number(value=1, precision=0, label="Frame t of the loaded session (follows the frame slider)",
                      elem_id="analysis-frame")
    gr.Markdown("### What if the other action had been taken?")
    cf_btn = gr.Button("Compare actions at frame t", elem_id="cf-btn")
    with gr.Row():
        cf_pictures = [image_block(f"Frame t+1 if {ACTION_NAMES.get(a, a)}", f"cf-{a}", FRAME_HEIGHT) for a in ACTIONS]
        cf_actual = image_block("Actual frame t+1", "cf-actual", FRAME_HEIGHT)
    cf_md = gr.Markdown(elem_id="cf-info")
    gr.Markdown("### Open-loop rollout: how fast do errors compound?")
    with gr.Row():
        rollout_k = gr.Number(value=APP.default_rollout_steps, precision=0, elem_id="rollout-k",
                              label=f"Steps k (1-{APP.max_rollout_steps})")
        rollout_btn = gr.Button("Roll out from frame t", elem_id="rollout-btn")
    rollout_image = image_block("Open-loop rollout", "rollout-image", CANVAS_HEIGHT * 2)
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
                               title="Prediction error per transition (frame t -> t+1)", x_title="frame t", x_label_angle=X_LABEL_ANGLE,
                               y_title="MSE", height=EVAL_PLOT_HEIGHT, show_label=False, label="Prediction error per transition",
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
    canvas_plot = line_plot("Single-canvas training loss", "canvas-plot", "loss", CANVAS_LOSS_COLOURS, x_title="step of this training")
    gr.Markdown("Red: the optimised, dot-weighted loss; orange: the plain masked-patch MSE of that canvas.",
                elem_id="canvas-legend")
    return {"canvas_steps": canvas_steps, "canvas_btn": canvas_btn, "canvas_progress": canvas_progress,
            "canvas_plot": canvas_plot}
