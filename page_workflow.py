"""Section 8 of the page, "Your work": record a session, browse the run history, save and load named
checkpoints, reset the model, export the views, metrics and settings.

Endpoints: ``/record_session`` (a generator), ``/browse_history``, ``/save_checkpoint``, ``/load_checkpoint``,
``/reset_model`` and ``/export``.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from autoencoder_concat_predictor_world_model import METRIC_KEYS
from checkpoints import CheckpointError, checkpoint_summaries
from run_controller import RunBusyError, RunController
from page_common import (
    APP,
    FRAME_HEIGHT,
    UserState,
    amplify_error,
    choice,
    code_span,
    display_path,
    hide_paths,
    image_block,
    os_error_text,
    refusal,
    validated,
    whole_number,
)
from page_outputs import NO_HISTORY, attention_outputs, display_outputs, history_outputs
from private_files import UnsafeFolderError
from record_session import RecordingRefused, RecordingTicket, record_session
from recording_robot import RecordingLimitError
from run_export import write_export
from session_explorer_lib import format_timestamp, markdown_escape, scan_sessions
from toroidal_action_selectors import PATTERN_NAMES

# -----------------------------------------------------------------------------
# named checkpoints and reset


def checkpoints_markdown(c: RunController) -> str:
    """The checkpoint folder as a table: name, step, iteration, time saved, session trained on."""
    summaries = checkpoint_summaries(c.checkpoint_path.parent)
    if not summaries:
        return "_No checkpoints saved yet._"
    rows = []
    for s in summaries:
        name = markdown_escape(s.name) + (" (shared: every run saves here)" if s.path == c.checkpoint_path else "")
        if s.problem:
            rows.append(f"| {name} | | | | {markdown_escape(hide_paths(s.problem))} |")
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
        raise refusal("Checkpoint name must be a non-empty name (letters, digits, - and _ read best).")
    return name.strip()


def _named_path(name: str, c: RunController, verb: str) -> Path:
    try:
        return c.named_checkpoint_path(name)
    except ValueError as e:
        raise refusal(f"Cannot {verb} checkpoint {markdown_escape(name)[:60]}: {hide_paths(e)}") from None


def check_save_checkpoint(name: Any, user: UserState) -> list[dict]:
    """Validator of ``save_checkpoint``: a free, well-formed name and a model to save (a refused name
    leaves the checkpoint list and its dropdown as they were)."""
    def check() -> None:
        shown, c = markdown_escape(_checkpoint_name(name))[:60], user.controller
        if _named_path(_checkpoint_name(name), c, "save").exists():
            raise refusal(f"Cannot save checkpoint {shown}: a checkpoint named {shown} already exists: choose another name")
        if not c.has_model:
            raise refusal(f"Cannot save checkpoint {shown}: there is no model to save yet: run the world model first")
    return validated(check, None)


def check_load_checkpoint(name: Any, user: UserState) -> list[dict]:
    """Validator of ``load_checkpoint``: the name of a checkpoint file in the checkpoint folder."""
    def check() -> None:
        if not _named_path(_checkpoint_name(name), user.controller, "load").is_file():
            raise refusal(f"Cannot load checkpoint {markdown_escape(name.strip())[:60]}: no checkpoint named "
                          f"{markdown_escape(name.strip())[:60]}")
    return validated(check, None)


def save_checkpoint(name: Any, user: UserState) -> tuple[str, gr.Dropdown]:
    """Save this tab's model as ``saved/checkpoints/toroidal_dot/<name>.pth`` (never over an existing file)."""
    name, c = _checkpoint_name(name), user.controller
    try:
        saved = c.save_named(name)
    except (ValueError, CheckpointError) as e:
        raise refusal(f"Cannot save checkpoint {markdown_escape(name)[:60]}: {hide_paths(e)}") from None
    except OSError as e:
        raise refusal(f"Cannot save checkpoint {markdown_escape(name)[:60]}: {os_error_text(e)}.") from None
    text = f"**Saved** {code_span(saved.path.name)} (step {saved.step}, iteration {saved.iteration}).\n\n"
    return text + checkpoints_markdown(c), checkpoint_choices(c, name)


def load_checkpoint(name: Any, user: UserState) -> tuple:
    """Load a named checkpoint into this tab's model; a damaged or foreign file is refused, model untouched."""
    name, c = _checkpoint_name(name), user.controller
    try:
        origin = c.load_named(name)
    except RunBusyError:
        raise refusal("A run is in progress in this tab: press Stop or wait for it to finish.") from None
    except (ValueError, CheckpointError) as e:
        raise refusal(f"Cannot load checkpoint {markdown_escape(name)[:60]}: {hide_paths(e)}") from None
    except OSError as e:
        raise refusal(f"Cannot load checkpoint {markdown_escape(name)[:60]}: {os_error_text(e)}.") from None
    text = f"**Loaded** {code_span(name + '.pth')} (step {origin.step}, iteration {origin.iteration}){origin.note}.\n\n"
    return (text + checkpoints_markdown(c), *display_outputs(user, final=True))


def reset_model(user: UserState) -> tuple:
    """A fresh model for this tab: metric history and graphs cleared, nothing deleted on disk."""
    try:
        user.controller.reset_model()
    except RunBusyError:
        raise refusal("A run is in progress in this tab: press Stop or wait for it to finish.") from None
    text = "**Reset:** this tab now has a fresh, untrained model; no file was deleted.\n\n"
    return (text + checkpoints_markdown(user.controller), *display_outputs(user, final=True))


def list_checkpoints(user: UserState) -> tuple[str, gr.Dropdown]:
    return checkpoints_markdown(user.controller), checkpoint_choices(user.controller)


# -----------------------------------------------------------------------------
# recording a session from the page


def _record_in_background(args: tuple, progress: dict, ticket: RecordingTicket) -> threading.Thread:
    """Run ``record_session`` on a thread; ``progress`` receives 'done', then 'path' or 'error'. The
    thread frees the ticket's place when the recording has really ended, and stops the recording when
    nobody has read ``progress['read']`` (the monotonic time its page last asked) for ``APP.record_orphan_s``:
    a client that went away without a cancel leaves its handler suspended, never closed."""
    pattern, steps, seed, radius, move = args

    def report(done: int, total: int) -> None:
        progress["done"] = done
        if time.monotonic() - progress["read"] > APP.record_orphan_s:
            ticket.stop.set()

    def work() -> None:
        try:
            progress["path"] = record_session(pattern, steps, seed, dot_radius=radius, move_pixels=move,
                                              max_bytes=ticket.allowance, stop=ticket.stop, count_blocks=True,
                                              progress=report)
        except Exception as e:  # reported to the page; a partial recording is kept and marked stopped
            progress["error"] = e
        finally:
            ticket.done()

    thread = threading.Thread(target=work, name="record-session", daemon=True)
    thread.start()
    return thread


RECORD_CHECKS = (  # pattern, steps, seed, dot radius, move pixels: each returns the value or refuses it
    lambda v: choice(v, PATTERN_NAMES, "Pattern"), lambda v: whole_number(v, "Steps", 3, APP.max_record_steps),
    lambda v: whole_number(v, "Seed", 0, 2**32 - 1), lambda v: whole_number(v, "Dot radius", 1, 50),
    lambda v: whole_number(v, "Move pixels", 0, 223))


def check_record_new_session(pattern: Any, steps: Any, seed: Any, dot_radius: Any, move_pixels: Any,
                             user: UserState | None = None) -> list[dict]:
    """Validator of ``record_new_session``: each setting under its own box (nothing to check in the tab's state)."""
    values = (pattern, steps, seed, dot_radius, move_pixels)
    return validated(*(functools.partial(check, value) for check, value in zip(RECORD_CHECKS, values)), None)


def record_new_session(pattern: Any, steps: Any, seed: Any, dot_radius: Any, move_pixels: Any, user: UserState,
                       request: gr.Request = None):
    """Record a new session with ``record_session.py``'s code (a fresh folder, never over another),
    streaming progress; then refresh the session lists with it selected.

    One recording per tab and ``APP.max_recordings`` on the server at once, within the disk budget
    (``RecordingGate``). The recording stops after its current action, its session kept (valid,
    marked stopped, listed), when the client cancels (this generator is closed), when the tab presses
    Stop (``stop_run``) or its connection closes (``TabRegistry.release``, by the connection's id from
    ``request``; ``release_user`` when its state goes), when nobody has asked for its progress for
    ``APP.record_orphan_s`` (a client gone without a word), or when it reaches the budget.
    """
    args = tuple(check(value) for check, value in zip(RECORD_CHECKS, (pattern, steps, seed, dot_radius, move_pixels)))
    # Gradio can close this handler only once it has handed out an update (a cancel that comes sooner
    # leaves it suspended, never closed): so nothing is taken or started before the first one
    yield f"**Recording:** starting ({args[0]}, seed {args[2]})", gr.skip(), gr.skip()
    try:
        ticket = user.recordings.start(user, args[1], getattr(request, "session_hash", None))
    except RecordingRefused as e:
        raise refusal(str(e)) from None
    progress = {"done": 0, "read": time.monotonic()}
    thread = _record_in_background(args, progress, ticket)
    try:
        while thread.is_alive():
            thread.join(APP.update_interval_s)
            yield f"**Recording:** {progress['done']}/{args[1]} actions ({args[0]}, seed {args[2]})", gr.skip(), gr.skip()
            progress["read"] = time.monotonic()  # the page asked for more: someone is still there
    finally:
        if thread.is_alive():  # closed by a cancel or a client gone: the recording ends after its current action
            ticket.stop.set()
    error = progress.get("error")
    if error is not None and not isinstance(error, RecordingLimitError):
        raise refusal(f"The recording failed: {hide_paths(error)}")
    path = progress["path"] if error is None else error.session_dir
    name = path.name
    names = [s.name for s in scan_sessions() if s.ok]
    selected = name if name in names else None
    frames = progress["done"] + 1
    settings = f"pattern {args[0]}, seed {args[2]}, dot radius {args[3]} px, move {args[4]} px"
    if error is not None:
        done = (f"**Recording stopped at the disk budget** for recordings from this page: session {code_span(name)} "
                f"keeps its {frames} frames ({settings}); it is selected above. Delete sessions you no longer need to "
                "record more.")
    elif frames < args[1] + 1:
        done = (f"**Recording stopped** after {frames - 1} of {args[1]} actions: session {code_span(name)} keeps its "
                f"{frames} frames ({settings}). It is selected above: press Load session.")
    else:
        done = (f"**Recorded** session {code_span(name)}: {frames} frames, {settings}. It is selected above: "
                "press Load session.")
    yield done, gr.Dropdown(choices=names, value=selected), gr.Dropdown(choices=names, value=selected)


# -----------------------------------------------------------------------------
# the run history


def _history_iteration(iteration: Any, user: UserState) -> int:
    if not user.controller.snapshots.iterations:
        raise refusal(NO_HISTORY)
    return whole_number(iteration, "Iteration", 0, 10**9)


def check_browse_history(iteration: Any, user: UserState) -> list[dict]:
    """Validator of ``browse_history`` (and Play)."""
    return validated(lambda: _history_iteration(iteration, user), None)


def browse_history(iteration: Any, user: UserState) -> tuple:
    """Frame, prediction, error map and metrics of the kept iteration nearest ``iteration``."""
    return history_outputs(user.controller, _history_iteration(iteration, user))


def play_history(iteration: Any, user: UserState):
    """Step the run-history slider from ``iteration`` to the latest kept one, a few per second."""
    start = _history_iteration(iteration, user)
    kept = [i for i in user.controller.snapshots.iterations if i >= start] or user.controller.snapshots.iterations
    for i in kept[:: max(1, len(kept) // APP.history_play_frames)]:
        yield (gr.Slider(value=i), *history_outputs(user.controller, i))
        time.sleep(APP.update_interval_s)


# -----------------------------------------------------------------------------
# export


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


def export_note(name: str, pictures: dict[str, tuple[np.ndarray | None, str]], rows: int) -> str:
    """What an export holds, and what is not in it yet and why (after a checkpoint load or a reset the
    model has no views, attention or history in this tab until it runs)."""
    missing = {stem for stem, (image, _) in pictures.items() if image is None}
    absent = [what for stems, what in (
        ({s for s in pictures if s.startswith("train_")}, "the four training views (no training step in this tab yet)"),
        ({s for s in pictures if s.startswith("prediction_")}, "the prediction views (no prediction in this tab yet)"),
        ({"attention"}, "the attention picture (captured at the end of a run)")) if stems & missing]
    if not rows:
        absent.append("metric rows: metrics.csv holds its header only (no iteration run in this tab since the model "
                      "was loaded, reset or made)")
    text = (f"**Exported** {code_span(name)}: {len(pictures) - len(missing)} of {len(pictures)} pictures, metrics.csv "
            f"({rows} rows), config.json, run.json and README.txt.")
    if absent:
        text += " **Not in the zip yet:** " + "; ".join(absent) + ". Run the world model, then export again to have them."
    return text


def export_results(user: UserState) -> str:
    """A zip of this tab's views (PNG), metric history (CSV), configuration (JSON) and a README.txt;
    ``user.export_note`` then says what it holds and what is not in it yet (``export_info`` shows it).

    It is written, 0600 and under a new name only, into a folder of its own inside the app's private
    export folder (``user.exports``, shared by the tabs); Gradio then copies it into its own cache to hand it out."""
    c = user.controller
    if not c.has_model:
        raise refusal("Nothing to export yet: run the world model first.")
    status = c.status()
    model_cfg = c.model_config  # with the decoder code a loaded checkpoint gave the model
    cfg = {**dataclasses.asdict(model_cfg), "architecture": model_cfg.architecture()}
    meta = {"session": c.session.name if c.session is not None else None, "model_step": status.model_step,
            "model_iteration": status.model_iteration, "iterations_in_history": len(c.history),
            "checkpoint": None if c.origin is None else f"{c.origin.kind} {display_path(c.origin.path)}",
            "exported_at": format_timestamp(time.time())}
    name = f"cwm_export_step{status.model_step}_iteration{status.model_iteration}.zip"
    folder = None
    try:
        root = user.exports.path()
        _remove_old_exports(root)
        folder = Path(tempfile.mkdtemp(prefix="export-", dir=root))  # 0700, a name nobody else can guess
        pictures, history = export_pictures(user), list(c.history)
        path = write_export(folder / name, pictures, history, cfg, meta, METRIC_KEYS)
        user.export_note = export_note(name, pictures, len(history))
        return str(path)
    except (OSError, UnsafeFolderError) as e:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        text = hide_paths(e) if isinstance(e, UnsafeFolderError) else os_error_text(e)
        raise gr.Error(f"Could not write the export: {text}.") from None


def _remove_old_exports(folder: Path, older_than_s: float = 3600.0) -> None:
    """Exports are handed to Gradio's cache at once; the copies here are cleaned up after an hour."""
    for old in folder.glob("export-*"):
        try:
            if time.time() - old.lstat().st_mtime > older_than_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def export_info(user: UserState) -> str:
    """The note of the tab's latest export (shown under the file once it is written)."""
    return user.export_note


# -----------------------------------------------------------------------------
# layout


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
        history_current = image_block("Frame t (2x)", "history-current", FRAME_HEIGHT)
        history_predicted = image_block("Predicted frame t+1 (2x)", "history-predicted", FRAME_HEIGHT)
        history_error = image_block("Its error (amplified)", "history-error", FRAME_HEIGHT)
    history_md = gr.Markdown(elem_id="history-info")
    return {"history_slider": history_slider, "play_btn": play_btn, "pause_btn": pause_btn,
            "history_current": history_current, "history_predicted": history_predicted, "history_error": history_error,
            "history_md": history_md}


SECTION_TITLE = "8. Your work: recording, run history, named checkpoints, reset and export"


def workflow_section() -> dict[str, Any]:
    """Section 8 (titled ``SECTION_TITLE`` by the fold the page puts it in): recording, run history,
    named checkpoints, reset and export."""
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
    export_md = gr.Markdown(elem_id="export-info")
    return {"export_btn": export_btn, "export_file": export_file, "export_md": export_md, "ckpt_name": ckpt_name, "ckpt_save": ckpt_save, "ckpt_choice": ckpt_choice, "ckpt_load": ckpt_load,
            "reset_btn": reset_btn, "ckpt_md": ckpt_md, **history, **record}
