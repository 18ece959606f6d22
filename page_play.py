"""Section 7 of the page, continued: play this tab's model with your own actions beside the world's
truth, and compare two models on the same frames. Neither trains a model.

Endpoints: ``/play_start``, ``/play`` and ``/compare_models``.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from checkpoints import CheckpointError, checkpoint_summaries
from frame_metrics import WITHIN_PX
from images import panel_grid
from page_analysis import rollout_strip, session_names
from page_common import (
    APP,
    CANVAS_HEIGHT,
    FRAME_HEIGHT,
    X_LABEL_ANGLE,
    UserState,
    format_px,
    format_value,
    hide_paths,
    image_block,
    open_session,
    refusal,
    require_session,
    session_folder,
    upscale,
    validated,
    whole_number,
)
from run_controller import RunBusyError
from session_explorer_lib import ACTION_NAMES, SessionError, markdown_escape
from world_model_analysis import ACTIONS, Comparison, Play, play_actions, play_frames

# -----------------------------------------------------------------------------
# constants

THIS_TAB = "this tab's model"  # the model choice that is not a named checkpoint
MODEL_BUSY = "The model is busy: a run is using it. Try again in a moment, or press Stop."
SERIES_A, SERIES_B = "model A", "model B"
COMPARE_COLOURS = {SERIES_A: "#2563eb", SERIES_B: "#ea580c"}


# -----------------------------------------------------------------------------
# play: pictures and text


def _position(xy: np.ndarray) -> str:
    return "no dot drawn" if math.isnan(xy[0]) else f"({xy[0]:.0f}, {xy[1]:.0f})"


def play_table(play: Play) -> pd.DataFrame:
    """One row per step: frame, action, the dot's true and imagined centre, dot error, MSE."""
    truth, imagined = play.dot_positions()  # (k, 2) each
    k, t = play.steps, play.frame_index
    return pd.DataFrame({
        "step": np.arange(1, k + 1), "frame": np.arange(t + 1, t + k + 1),
        "action": [ACTION_NAMES.get(a, str(a)) for a in play.actions],
        "true dot (x, y)": [_position(p) for p in truth], "imagined dot (x, y)": [_position(p) for p in imagined],
        "dot error": [format_px(float(e)) for e in play.dot_error], "MSE": np.round(np.array(play.mse, float), 6)})


def play_text(play: Play, model_step: int | None) -> str:
    world, t, k = play.world.params(), play.frame_index, play.steps
    text = (f"**Playing from frame {t}** of session {markdown_escape(getattr(play.session, 'name', ''))}: "
            f"{k} of at most {APP.max_play_steps} steps ({''.join(map(str, play.actions)) or 'none yet'}), each "
            f"imagined by this tab's model (step {model_step}) from its own previous prediction. The truth is the "
            f"dot world simulated from frame {t}: dot at ({world['start_x']}, {world['start_y']}), radius "
            f"{world['dot_radius']} px, move {world['move_pixels']} px.")
    if not k:
        return text + " Press Stay or Move, or type actions."
    within = int((np.array(play.dot_error) <= WITHIN_PX).sum())
    return (text + f" Step {k}: dot error {format_px(float(play.dot_error[-1]))}, MSE "
            f"{format_value(float(play.mse[-1]))}; the imagined dot is within 3 px of the true one at {within} of {k} steps.")


def play_outputs(play: Play, model_step: int | None) -> tuple:
    """[imagined frame, true frame, strip, per-step table, markdown]: the latest step's pictures (frame t
    before the first), the strip of every step (column 0: frame t)."""
    k, t = play.steps, play.frame_index
    imagined = play.imagined[-1] if k else play.start
    truth = play.truth[-1] if k else play.start_truth
    strip, gain = rollout_strip(np.stack([play.start_truth, *play.truth]), np.stack([play.start, *play.imagined]))
    return (gr.update(value=upscale(imagined), label=f"Imagined frame {t + k}" if k else f"Frame {t} (recorded)"),
            gr.update(value=upscale(truth), label=f"True frame {t + k} (simulated)"),
            gr.update(value=strip, label=f"Rows: the world's truth, imagined, |error| x{gain:.1f}; columns: frames {t}-{t + k}"),
            play_table(play), play_text(play, model_step))


# -----------------------------------------------------------------------------
# play: handlers


def _play_frame(frame_index: Any, user: UserState) -> int:
    """Frame t a play may start from (the loaded session's frames K-1 to n-1); a refusal otherwise."""
    return whole_number(frame_index, "Frame index", *play_frames(require_session(user), user.controller.config))


def _play_actions(actions: Any, user: UserState) -> None:
    """Refuse actions the tab's play cannot take (no play yet, a bad string, past its length)."""
    current = user.controller.current_play()
    if current is None:
        raise refusal("No play has begun on the loaded session: press Reset to frame t first.")
    try:
        play_actions(actions, current, APP.max_play_steps)
    except ValueError as e:
        raise refusal(f"Cannot play: {e}") from None


def check_play_start(frame_index: Any, user: UserState) -> list[dict]:
    """Validator of ``play_start``: a refused frame leaves the play's pictures as they were."""
    return validated(lambda: _play_frame(frame_index, user), None)


def check_play(actions: Any, user: UserState) -> list[dict]:
    """Validator of ``play``: the actions under their box."""
    return validated(lambda: _play_actions(actions, user), None)


def check_play_typed(frame_index: Any, actions: Any, user: UserState) -> list[dict]:
    """Validator of the buttons: frame t when they start a play, the actions when one is going."""
    going = user.controller.current_play() is not None
    return validated(None if going else (lambda: _play_frame(frame_index, user)),
                     (lambda: _play_actions(actions, user)) if going else None, None)


def check_play_step(frame_index: Any, user: UserState) -> list[dict]:
    """Validator of Stay and Move: frame t when they start a play, the play's length when one is going."""
    going = user.controller.current_play() is not None
    return validated((lambda: _play_actions("0", user)) if going else (lambda: _play_frame(frame_index, user)), None)


def play_start(frame_index: Any, user: UserState) -> tuple:
    """Begin a new play from frame t of the loaded session (the one before is dropped)."""
    t = _play_frame(frame_index, user)
    try:
        play = user.controller.play_start(t)
    except (ValueError, SessionError) as e:
        raise refusal(f"Cannot play from frame {t}: {hide_paths(e)}") from None
    return play_outputs(play, user.controller.status().model_step)


def play(actions: Any, user: UserState) -> tuple:
    """Continue the play with ``actions`` (a string of 0 = stay and 1 = move right); never trains."""
    try:
        current = user.controller.play(actions, APP.max_play_steps)
    except RunBusyError:
        raise refusal(MODEL_BUSY) from None
    except (ValueError, SessionError) as e:
        raise refusal(f"Cannot play: {hide_paths(e)}") from None
    return play_outputs(current, user.controller.status().model_step)


def play_typed(frame_index: Any, actions: Any, user: UserState) -> tuple:
    """The page's buttons: continue the play, first starting one at frame t when none is going."""
    if user.controller.current_play() is None:
        play_start(frame_index, user)
    return play(actions, user)


def play_stay(frame_index: Any, user: UserState) -> tuple:
    return play_typed(frame_index, "0", user)


def play_move(frame_index: Any, user: UserState) -> tuple:
    return play_typed(frame_index, "1", user)


# -----------------------------------------------------------------------------
# compare: pictures and text


def _summary_cells(m: dict) -> list[str]:
    if not m["n"]:
        return ["", "", ""]
    share = "n/a" if math.isnan(m["within_3px"]) else f"{100 * m['within_3px']:.0f} %"
    median = m["median_dot_error_px"]
    return [share, "n/a" if math.isnan(median) else format_px(median), format_value(m["mse_ratio"], 3)]


def comparison_markdown(cmp: Comparison) -> str:
    """Both models' summaries side by side: all transitions, after stay, after move."""
    a, b = cmp.evaluations
    rows = []
    for title, action in (("all", None), *((f"after {ACTION_NAMES.get(x, x)}", x) for x in ACTIONS)):
        sa, sb = a.summary(action), b.summary(action)
        cells = [c for pair in zip(_summary_cells(sa), _summary_cells(sb)) for c in pair]
        rows.append(f"| {title} | {sa['n']} | " + " | ".join(cells) + " |")
    who = [f"**{side}**: {markdown_escape(name)} (step {ev.model_step}, iteration {ev.model_iteration})"
           for side, name, ev in zip("AB", cmp.names, cmp.evaluations)]
    return "\n".join([
        f"**Session {markdown_escape(a.session_name)}**: both models predicted all {len(a.mse)} transitions in "
        f"{cmp.seconds:.1f} s (batched, no training). {who[0]}; {who[1]}. MSE vs copy < 1: better than repeating "
        "the last frame.", "",
        "| transitions | n | within 3 px A | within 3 px B | median dot error A | median dot error B | "
        "MSE vs copy A | MSE vs copy B |", "|---|---|---|---|---|---|---|---|", *rows])


def comparison_plot(cmp: Comparison) -> pd.DataFrame:
    """Both models' dot error per transition; a missing dot at the torus's largest distance, none where
    the actual frame has no dot."""
    parts = [pd.DataFrame({"frame": [np.nan] * 2, "dot error": [np.nan] * 2, "series": list(COMPARE_COLOURS)})]
    for series, ev in zip(COMPARE_COLOURS, cmp.evaluations):
        error = ev.dot_error.copy()  # (T,)
        error[np.isinf(error)] = cmp.no_dot_px
        parts.append(pd.DataFrame({"frame": ev.frame_index, "dot error": error, "series": series}).dropna())
    return pd.concat(parts, ignore_index=True)


def disagreement_outputs(cmp: Comparison) -> tuple:
    """[picture: one row per transition (A's prediction, B's, the actual frame t+1), markdown table]."""
    if not len(cmp.top):
        return gr.update(value=None), "**The two models predict every transition alike** (same dot errors and MSE)."
    a, b = cmp.evaluations
    panels = [p for i in range(len(cmp.top)) for p in (cmp.top_predictions[0, i], cmp.top_predictions[1, i], cmp.top_actual[i])]
    rows = [f"| {r + 1} | {a.frame_index[i]} -> {a.frame_index[i] + 1} | {ACTION_NAMES.get(int(a.action[i]), a.action[i])} | "
            f"{format_px(float(a.dot_error[i]))} | {format_px(float(b.dot_error[i]))} | {format_value(a.mse[i])} | "
            f"{format_value(b.mse[i])} |" for r, i in enumerate(cmp.top)]
    text = "\n".join([f"**Where they disagree most** (top {len(cmp.top)}, by dot error, then MSE): the picture's "
                      "rows in this order, columns A's prediction, B's prediction, the actual frame.", "",
                      "| rank | transition | action | dot error A | dot error B | MSE A | MSE B |",
                      "|---|---|---|---|---|---|---|", *rows])
    picture = panel_grid(panels, columns=3, gap=4)
    return gr.update(value=picture, label=f"Top {len(cmp.top)} disagreements: A, B, actual"), text


def comparison_outputs(cmp: Comparison) -> tuple:
    """[summary markdown, per-transition plot data, disagreement picture, its markdown]."""
    return (comparison_markdown(cmp), comparison_plot(cmp), *disagreement_outputs(cmp))


# -----------------------------------------------------------------------------
# compare: handlers


def model_choices(user: UserState) -> tuple[gr.Dropdown, gr.Dropdown]:
    """This tab's model and every readable named checkpoint, for models A and B."""
    c = user.controller
    names = [s.name for s in checkpoint_summaries(c.checkpoint_path.parent) if not s.problem and s.path != c.checkpoint_path]
    choices = [THIS_TAB, *names]
    return gr.Dropdown(choices=choices, value=THIS_TAB), gr.Dropdown(choices=choices, value=choices[min(1, len(names))])


def _model_name(name: Any, what: str) -> str | None:
    if name == THIS_TAB:
        return None
    if not isinstance(name, str) or not name.strip():
        raise refusal(f"{what} must be a checkpoint name or {THIS_TAB!r}.")
    return name.strip()


def check_compare_models(name_a: Any, name_b: Any, session_choice: Any, user: UserState) -> list[dict]:
    """Validator of ``compare_models``: each model name and the session under its own box."""
    return validated(lambda: _model_name(name_a, "Model A"), lambda: _model_name(name_b, "Model B"),
                     lambda: session_folder(session_choice), None)


def compare_models(name_a: Any, name_b: Any, session_choice: Any, user: UserState, progress=gr.Progress()) -> tuple:
    """Two models (named checkpoints or this tab's) on every transition of a session; never trains."""
    names = _model_name(name_a, "Model A"), _model_name(name_b, "Model B")
    session = open_session(session_choice)

    def report(done: int, total: int) -> None:
        progress(done / total, desc=f"{done}/{total} transitions")

    try:
        cmp = user.controller.compare(*names, session, APP.evaluation_batch, APP.compare_top_frames, report)
    except (ValueError, CheckpointError, SessionError) as e:
        raise refusal(f"Cannot compare: {hide_paths(e)}") from None
    return comparison_outputs(cmp)


# -----------------------------------------------------------------------------
# layout


def play_section() -> dict[str, Any]:
    """Play (Stay, Move, typed actions, Reset to frame t) and compare two models."""
    gr.Markdown(f"### Play the model: your actions, imagined open loop, beside the world's truth\n"
                f"From frame t (the box above, 2 or later), each Stay or Move asks this tab's model for the next "
                f"frame given its own previous prediction; beside it the dot world simulated from frame t with the "
                f"same actions. At most {APP.max_play_steps} steps; never trains.")
    with gr.Row():
        reset = gr.Button("Reset to frame t", elem_id="play-reset-btn", scale=1)
        stay = gr.Button("Stay", elem_id="play-stay-btn", scale=1)
        move = gr.Button("Move", elem_id="play-move-btn", scale=1)
        typed = gr.Textbox(label=f"Actions (0 = stay, 1 = move right; up to {APP.max_play_steps})", placeholder="e.g. 1101",
                           elem_id="play-actions", scale=2)
        typed_btn = gr.Button("Play these actions", elem_id="play-actions-btn", scale=1)
    with gr.Row():
        imagined = image_block("Imagined frame", "play-imagined", FRAME_HEIGHT)
        truth = image_block("True frame (simulated)", "play-truth", FRAME_HEIGHT)
    strip = image_block("The play so far", "play-strip", CANVAS_HEIGHT * 2)
    table = gr.Dataframe(label="Per step", elem_id="play-table", interactive=False, wrap=True)
    info = gr.Markdown(elem_id="play-info")
    return {"play_reset": reset, "play_stay": stay, "play_move": move, "play_typed": typed, "play_typed_btn": typed_btn,
            "play_imagined": imagined, "play_truth": truth, "play_strip": strip, "play_table": table,
            "play_info": info, **_compare_block()}


def _compare_block() -> dict[str, Any]:
    gr.Markdown("### Compare two models on the same frames (every transition, no training)")
    with gr.Row():
        model_a = gr.Dropdown(label="Model A", choices=[THIS_TAB], value=THIS_TAB, allow_custom_value=True,
                              elem_id="compare-a", scale=2)
        model_b = gr.Dropdown(label="Model B", choices=[THIS_TAB], value=THIS_TAB, allow_custom_value=True,
                              elem_id="compare-b", scale=2)
        session = gr.Dropdown(label="Session", choices=[], allow_custom_value=True, elem_id="compare-session", scale=2)
        button = gr.Button("Compare", elem_id="compare-btn", scale=1)
    summary = gr.Markdown(elem_id="compare-info")
    plot = gr.ScatterPlot(pd.DataFrame({"frame": [np.nan] * 2, "dot error": [np.nan] * 2, "series": list(COMPARE_COLOURS)}),
                          x="frame", y="dot error", color="series", color_map=COMPARE_COLOURS, elem_id="compare-plot",
                          title="Dot error per transition (frame t -> t+1); no dot drawn: plotted at the largest distance",
                          x_title="frame t", y_title="dot error (px)", x_label_angle=X_LABEL_ANGLE, height=300, show_label=False,
                          label="Dot error per transition", buttons=["fullscreen", "export"])
    top_image = image_block("Where they disagree most", "compare-top", CANVAS_HEIGHT * 3)
    top_md = gr.Markdown(elem_id="compare-top-info")
    return {"compare_a": model_a, "compare_b": model_b, "compare_session": session, "compare_btn": button,
            "compare_md": summary, "compare_plot": plot, "compare_top": top_image, "compare_top_md": top_md}


def refresh_compare_lists(user: UserState) -> tuple:
    """The model and session lists of the comparison (on page load and with Refresh sessions)."""
    return (*model_choices(user), session_names())
