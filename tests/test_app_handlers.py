"""Direct tests of the explorer's handlers (no server): input checks, one real run, stop, attention
redraw speed, checkpoints, tab clean-up and the command line."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import concat_world_model_explorer_gradio as app
import attention_viz
import page_attention
import page_common
import page_outputs
import page_run
import page_sessions
import config
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from model_pool import ModelPool
from frame_metrics import latest_dot_hits
from run_controller import RunController, RunStatus
from conftest import free_port
from record_session import record_session

SESSION = "handler_alternate"
FIXED_ENDPOINTS = {"refresh_sessions", "load_session", "update_frame", "jump_to_frame", "run_world_model", "stop",
                   "update_attention_viz", "counterfactual", "rollout", "evaluate_session", "train_single_canvas",
                   "patch_attention", "record_session", "save_checkpoint", "load_checkpoint", "reset_model", "export",
                   "browse_history", "play_start", "play", "compare_models"}
ALL_ON = (True,) * 9  # 5 layers + 4 heads


# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sessions_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("handler_sessions")
    record_session("alternate", 24, 0, name=SESSION, root=root)
    return root


@pytest.fixture
def env(sessions_root, tmp_path, monkeypatch) -> Path:
    """Point the app at the recorded sessions and a private checkpoint path; returns the checkpoint path."""
    checkpoint = tmp_path / "checkpoints" / "autoencoder.pth"
    monkeypatch.setattr(config, "SESSIONS_ROOT", sessions_root)
    monkeypatch.setattr(config, "CHECKPOINT_PATH", checkpoint)
    return checkpoint


@pytest.fixture
def loaded(env) -> page_common.UserState:
    user = page_common.UserState()
    page_sessions.load_session(SESSION, user)
    return user


def run_all(num_iterations, user: page_common.UserState) -> list[tuple]:
    """Consume a run; returns every streamed update (state first, then RUN_OUTPUT_KEYS)."""
    return list(page_run.run_world_model(num_iterations, user))


def out(update: tuple, key: str):
    """One output of a run update; a graph as its DataFrame."""
    value = update[1 + page_outputs.RUN_OUTPUT_KEYS.index(key)]
    return value["value"] if key.startswith("plot_") else value


def drawn(graph, series: str):
    """The points of one series of a graph's DataFrame (its null colour-anchor row left out)."""
    graph = graph.dropna()
    return graph[graph.series == series]


def error_message(fn, *args) -> str:
    with pytest.raises(gr.Error) as info:
        result = fn(*args)
        if isinstance(result, types.GeneratorType):
            next(result)
    return str(info.value.message)


# -----------------------------------------------------------------------------
# structure


def test_build_demo_declares_the_fixed_endpoints_without_launching():
    demo = app.build_demo()
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert FIXED_ENDPOINTS <= api_names
    run = next(fn for fn in demo.fns.values() if fn.api_name == "run_world_model")
    assert run.concurrency_id == "model" and run.concurrency_limit == 4
    images = [b for b in demo.blocks.values() if isinstance(b, gr.Image)]
    # 1 frame + 4 training + 3 prediction + prediction canvas + attention + picker + patch + 2 counterfactual
    # + actual + rollout + play's imagined, true and strip + the comparison's disagreements + 3 run history
    assert len(images) == 23 and all(b.format == "png" for b in images)
    picture = np.zeros((8, 8, 3), np.uint8)
    for block in images:  # each writes a picture once: shown again, the same file, not written again
        first = Path(block.postprocess(picture).path)
        first.write_bytes(b"left as it was")
        assert Path(block.postprocess(picture.copy()).path) == first and first.read_bytes() == b"left as it was"
    assert not any(isinstance(b, gr.Plot) for b in demo.blocks.values())  # native LinePlots only
    assert getattr(demo, "server", None) is None  # nothing was launched


def test_a_picture_shown_again_is_never_served_half_written(tmp_path):
    """An update that carries a picture the page already shows (a frame that did not change) must
    not rewrite the file a browser may be fetching at that moment: every read of the handed-out file,
    taken while the same picture is output again and again, is the whole PNG of those pixels. (Gradio's
    own gr.Image rewrites it in place: against it this test reads an empty file within the first second.)"""
    block = page_common.image_block("Frame", "frame-under-test", 100)
    block.GRADIO_CACHE = str(tmp_path)
    picture = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    path = Path(block.postprocess(picture).path)
    whole = path.read_bytes()
    stop, handed_out = threading.Event(), set()

    def show_again() -> None:
        while not stop.is_set():
            handed_out.add(block.postprocess(picture.copy()).path)
    writer = threading.Thread(target=show_again)
    writer.start()
    reads = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert path.read_bytes() == whole
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 100 and handed_out == {str(path)}  # same pixels, same file
    assert np.array_equal(np.asarray(Image.open(path)), picture)
    other = picture.copy()
    other[0, 0, 0] ^= 1  # one value differs: another file
    assert Path(block.postprocess(other).path) != path
    assert block.postprocess(None) is None


def test_a_run_leaves_no_model_in_the_modules_globals_and_never_loads_pyplot(loaded):
    run_all(1, loaded)
    kinds = (RunController, ModelPool, AutoencoderConcatPredictorWorldModel, page_common.UserState)
    assert [name for name, value in vars(app).items() if isinstance(value, kinds)] == []
    assert "matplotlib.pyplot" not in sys.modules  # pictures are drawn with numpy/Pillow, graphs by Gradio


# -----------------------------------------------------------------------------
# input checks


@pytest.mark.parametrize("value, expected", [(1, 1), (500, 500), (7.0, 7), (np.int64(3), 3)])
def test_whole_number_accepts_whole_numbers_in_range(value, expected):
    assert page_common.whole_number(value, "Number of iterations", 1, 500) == expected


@pytest.mark.parametrize("value", [0, -1, 501, 10**12, float("nan"), float("inf"), float("-inf"), None, "5", "abc",
                                   3.5, True, False, [5]])
def test_whole_number_refuses_everything_else_naming_the_field(value):
    with pytest.raises(gr.Error) as info:
        page_common.whole_number(value, "Number of iterations", 1, 500)
    assert "Number of iterations must be a whole number from 1 to 500" in info.value.message


@pytest.mark.parametrize("value", [-0.1, 100.5, float("nan"), float("inf"), None, "95", True])
def test_quantile_outside_0_to_100_is_refused(value):
    with pytest.raises(gr.Error, match="Quantile must be a number from 0 to 100"):
        page_common.parse_quantile(value)


def test_running_or_scrubbing_before_loading_asks_to_load_first(env):
    user = page_common.UserState()
    assert "Load a session first" in error_message(page_run.run_world_model, 5, user)
    assert "Load a session first" in error_message(page_sessions.update_frame, 0, user)
    assert "Load a session first" in error_message(page_sessions.jump_to_frame, 0, user)
    assert not user.controller.has_model


def test_validators_refuse_before_the_handler_runs_naming_the_input_and_log_one_line(loaded, caplog):
    """Each refusable input has its event's validator: the refusal is a ``gr.validate`` on that input
    (Gradio then queues nothing and changes no output), the other inputs are fine; the terminal gets
    one line, not a traceback."""
    import page_analysis
    import page_workflow
    caplog.set_level("INFO", logger=config.LOGGER_NAME)
    jump = page_sessions.check_jump_to_frame(999, loaded)
    assert [v["is_valid"] for v in jump] == [False, True]
    assert jump[0]["message"] == "Frame number must be a whole number from 0 to 24 (got 999)."
    assert [v["is_valid"] for v in page_sessions.check_jump_to_frame(12, loaded)] == [True, True]
    assert [r.getMessage() for r in caplog.records] == ["refused: Frame number must be a whole number from 0 to 24 (got 999)."]
    assert all(r.exc_info is None for r in caplog.records)
    assert not page_common.refusal("x").print_exception  # Gradio prints no traceback for it
    record = page_workflow.check_record_new_session("alternate", 2, 0, 5, 300, loaded)  # steps and move refused, each on its box
    assert [v["is_valid"] for v in record] == [True, False, True, True, False, True]
    assert "Steps must be a whole number from 3" in record[1]["message"] and "Move pixels" in record[4]["message"]
    assert [v["is_valid"] for v in page_analysis.check_rollout(0, 99, loaded)] == [False, False, True]
    assert "Load a session first" in page_run.check_run_world_model(5, page_common.UserState())[0]["message"]
    assert "Run the world model first" in page_attention.check_patch_attention(3, 3, loaded)[0]["message"]
    assert "no model to save yet" in page_workflow.check_save_checkpoint("fine-name", loaded)[0]["message"]


def test_a_checkpoint_name_already_taken_is_refused_by_the_validator(loaded):
    import page_workflow
    run_all(1, loaded)
    page_workflow.save_checkpoint("taken", loaded)
    answer = page_workflow.check_save_checkpoint(" taken ", loaded)
    assert not answer[0]["is_valid"] and "a checkpoint named taken already exists" in answer[0]["message"]
    assert page_workflow.check_save_checkpoint("free", loaded)[0]["is_valid"]
    assert page_workflow.check_load_checkpoint("taken", loaded)[0]["is_valid"]
    assert "no checkpoint named nope" in page_workflow.check_load_checkpoint("nope", loaded)[0]["message"]


# -----------------------------------------------------------------------------
# sessions and frames


def test_load_shows_info_and_frame_zero(env):
    user = page_common.UserState()
    _, info, slider, image, frame_md, jump = page_sessions.load_session(SESSION, user)
    assert "**Frames:** 25" in info and "**Actions:** 24" in info and "ToroidalDotRobot" in info
    assert slider.maximum == 24 and image.shape == (448, 448, 3) and image.max() == 255
    assert "**Frame 0**" in frame_md and "**Action after it:** 0 = stay" in frame_md and jump == 0


def test_update_frame_and_jump_move_the_start_frame_and_the_frame_number_box(loaded):
    image, frame_md, number = page_sessions.update_frame(3.0, loaded)
    assert loaded.controller.start_frame == 3 and number == 3
    assert "**Frame 3**" in frame_md and "**Step:** 6" in frame_md
    slider, _, frame_md = page_sessions.jump_to_frame(24, loaded)
    assert slider.value == 24 and "none (the last frame)" in frame_md
    for bad in (25, -1, 2.5, float("nan"), "3", None):
        assert "Frame index must be a whole number from 0 to 24" in error_message(page_sessions.update_frame, bad, loaded)
    assert loaded.controller.start_frame == 24


# -----------------------------------------------------------------------------
# running


def test_the_progress_line_counts_the_latest_predictions_that_found_the_dot(monkeypatch):
    """Every update of a run (once a second) says how many of the latest predictions found the dot,
    so a user sees the moment it is found without waiting for the graphs (redrawn every 3 s)."""
    window = page_common.APP.dot_window
    history = [{"dot_error": 9.0}] * 20 + [{"dot_error": None}] * 3 + [{"dot_error": 1.0}] * 46 + [{"dot_error": np.inf}] * 4
    status = RunStatus("running", 70, 100, "", 70, 70, history[-1])
    assert "**dot found:** 46 of the last 50 within 3 px" in page_outputs.progress_markdown(status, latest_dot_hits(history, window))
    assert latest_dot_hits(history[:25], window) == (2, 22)
    assert "**dot found:** 2 of the first 22 within 3 px" in page_outputs.progress_markdown(status, (2, 22))
    assert latest_dot_hits([{"dot_error": None}], window) is None
    assert "dot found" not in page_outputs.progress_markdown(status, None)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_time_to_dot  # its --app mode reads the count from this line: the two must agree

    seen = bench_time_to_dot.PROGRESS_DOT.search(page_outputs.progress_markdown(status, (46, 50)))
    assert seen and seen.groupdict() == {"iteration": "70", "hits": "46", "scored": "50"}


def test_run_streams_progress_saves_a_checkpoint_and_captures_attention(loaded, env):
    started = time.monotonic()
    stamps = []
    updates = []
    for update in page_run.run_world_model(4, loaded):
        stamps.append(time.monotonic() - started)
        updates.append(update)
    final = updates[-1]
    assert out(final, "progress").startswith("**Done: 4/4**")
    c = loaded.controller
    assert len(updates) >= 2 and c.status().done == 4 and not c.running
    hits = sum(m["dot_error"] <= 3.0 for m in c.history if m["dot_error"] is not None)
    scored = sum(m["dot_error"] is not None for m in c.history)
    assert scored >= 1 and f"**dot found:** {hits} of the first {scored} within 3 px" in out(final, "progress")
    longest = max(m["iteration_time"] for m in c.history)
    gaps = np.diff([0.0, *stamps])
    assert gaps.max() <= page_common.APP.update_interval_s + longest + 1.0  # updates arrive on a time budget
    assert env.is_file() and "**Saved**" in out(final, "checkpoint")
    assert c.attention is not None and "connections" in out(final, "attn_stats")
    error, timing, loss = out(final, "plot_error"), out(final, "plot_time"), out(final, "plot_loss")
    assert len(drawn(timing, page_outputs.SERIES_TIME)) == 4
    span = drawn(timing, page_outputs.SERIES_SPAN)  # one invisible point: whole-number ticks for a short run
    assert list(span["iteration"]) == [10]
    assert len(drawn(error, page_outputs.SERIES_PREDICTION)) == 2  # from iteration 3 on
    assert len(drawn(loss, page_outputs.SERIES_LOSS)) == 2
    dot = drawn(out(final, "plot_dot"), page_outputs.SERIES_DOT)  # one share per scored prediction, in percent
    assert len(dot) == 2 and dot["value"].between(0, 100).all()
    for key in ("train_original", "train_composite", "pred_current"):
        assert out(final, key).max() > 0
    assert out(final, "frame_slider").value == 4  # the next run continues where this one stopped


def test_a_running_update_redraws_the_costly_pictures_only_every_few_updates(loaded):
    """While a run goes, the progress and predicted frame come with every update; the training views,
    the prediction canvas and the graphs with every ``run_views_every``-th; the final update has
    everything."""
    c = loaded.controller
    list(page_run.run_world_model(3, loaded))  # a model with views to show
    light = page_outputs.display_outputs(loaded, final=False, views=False)
    full = page_outputs.display_outputs(loaded, final=False, views=True)
    skipped = lambda update, key: isinstance(update[page_outputs.RUN_OUTPUT_KEYS.index(key)], dict) and \
        update[page_outputs.RUN_OUTPUT_KEYS.index(key)].get("__type__") == "update" and \
        len(update[page_outputs.RUN_OUTPUT_KEYS.index(key)]) == 1
    for key in ("train_original", "train_inpainting", "pred_canvas", "plot_dot", "plot_error"):
        assert skipped(light, key) and not skipped(full, key), key
    for key in ("pred_next", "pred_current", "pred_error", "progress"):
        assert not skipped(light, key), key
    assert c.status().done == 3


def test_dot_found_graph_is_the_rolling_share_within_3px_and_a_missing_dot_is_a_miss():
    history = [{"iteration": i + 1, "dot_error": e} for i, e in enumerate([None, float("inf"), 1.0, 5.0, 2.0, 0.5])]
    rows = page_outputs.dot_found_rows(history, window=2)
    assert [r["iteration"] for r in rows] == [2, 3, 4, 5, 6]  # iterations without a scored dot are skipped
    assert [r["within_3px_share"] for r in rows] == [0.0, 50.0, 50.0, 50.0, 100.0]
    assert page_outputs.dot_found_rows([{"iteration": 1, "dot_error": None}], window=50) == []


def test_the_error_graph_draws_each_prediction_faint_and_their_rolling_means_over_them():
    """On an alternating session the baseline is exact after a stay and wrong after a move: its
    points jump every iteration, its rolling mean is a flat line that can be read over the model's."""
    history = [{"iteration": i, "prediction_error": 0.002, "copy_error": 0.0032 * (i % 2)} for i in range(1, 41)]
    error = page_outputs.metric_frames(history)[0]
    raw, mean = drawn(error, page_outputs.SERIES_BASELINE), drawn(error, page_outputs.SERIES_BASELINE_MEAN)
    assert len(raw) == len(mean) == 40 and set(raw["value"]) == {0.0, 0.0032}
    window = page_common.APP.error_window
    assert np.allclose(mean["value"].iloc[window - 1:], 0.0016)  # a full window of an even length: half the error
    assert np.allclose(drawn(error, page_outputs.SERIES_PREDICTION_MEAN)["value"], 0.002)
    colours = list(page_outputs.ERROR_COLOURS)  # the drawing order: the means last, over the faint points
    assert colours[-2:] == [page_outputs.SERIES_BASELINE_MEAN, page_outputs.SERIES_PREDICTION_MEAN]
    assert page_outputs.ERROR_COLOURS[page_outputs.SERIES_BASELINE_MEAN] != page_outputs.ERROR_COLOURS[
        page_outputs.SERIES_PREDICTION_MEAN]


def test_a_run_past_the_sessions_end_marks_where_the_replay_looped_in_every_graph(loaded):
    """The 25-frame session ends after iteration 25 (frame 24): that iteration is flagged, and every
    graph draws a vertical mark at 25.5 across its values; the two iterations after it score nothing."""
    final = run_all(28, loaded)[-1]
    history = loaded.controller.history
    assert [m["iteration"] for m in history if m.get("replay_looped")] == [25]
    assert [m["iteration"] for m in history if m["prediction_error"] is None] == [1, 2, 26, 27]
    for key in page_outputs.PLOT_KEYS:
        mark = drawn(out(final, key), f"{page_outputs.SERIES_LOOP} (1)")
        assert list(mark["iteration"]) == [25.5, 25.5], key
    error = out(final, "plot_error").dropna()
    mark = drawn(error, f"{page_outputs.SERIES_LOOP} (1)")
    assert list(mark["value"]) == [error["value"].min(), error["value"].max()]  # from the lowest value to the highest
    assert list(drawn(out(final, "plot_dot"), f"{page_outputs.SERIES_LOOP} (1)")["value"]) == [0.0, 100.0]
    assert all(f"{page_outputs.SERIES_LOOP} (1)" in colours for colours in (
        page_outputs.ERROR_COLOURS, page_outputs.TIME_COLOURS, page_outputs.GRAD_COLOURS))


def test_only_the_latest_replay_loops_are_marked():
    history = [{"iteration": i, "iteration_time": 0.1, "replay_looped": i % 3 == 0 or None} for i in range(1, 200)]
    timing = page_outputs.metric_frames(history)[1]
    marks = timing.dropna()[timing.dropna().series.str.startswith(page_outputs.SERIES_LOOP)]
    assert len(marks) == 2 * page_outputs.LOOP_MARKS and marks["iteration"].max() == 198.5


def test_after_a_run_the_run_history_shows_its_last_iteration_and_reset_clears_every_view(loaded):
    """The run history's slider, pictures and text are written together at the end of a run (the
    last kept iteration: the run's last prediction); a reset clears graphs, views and history."""
    import page_workflow
    final = run_all(4, loaded)[-1]
    c = loaded.controller
    assert out(final, "history_slider").value == 4 and out(final, "history_md").startswith("**Iteration 4** |")
    np.testing.assert_array_equal(out(final, "history_predicted"), page_common.upscale(c.snapshots.nearest(4).predicted))
    np.testing.assert_array_equal(out(final, "history_predicted"), out(final, "pred_next"))  # the run's last prediction
    reset = page_workflow.reset_model(loaded)[1:]
    shown = dict(zip(page_outputs.RUN_OUTPUT_KEYS, reset))
    for key in page_outputs.PLOT_KEYS:
        assert shown[key]["value"].dropna().empty, key  # no point left of the old model's history
    for key in (*page_outputs.TRAIN_VIEW_KEYS, "pred_current", "pred_next", "attn_image", "attn_picker", "patch_image",
                "history_current", "history_predicted", "history_error"):
        value = shown[key]
        assert (value["value"] if isinstance(value, dict) else value) is None, key
    assert "No run history yet" in shown["history_md"] and shown["history_slider"].interactive is False


def test_a_chosen_patch_is_redrawn_from_the_next_runs_attention(loaded):
    import page_attention
    run_all(3, loaded)
    first, _, _ = page_attention.patch_attention(4, 9, loaded)
    final = run_all(3, loaded)[-1]
    assert out(final, "patch_md").startswith(page_attention.patch_attention(4, 9, loaded)[1][:40])
    assert out(final, "patch_image") is not None and out(final, "patch_image").shape == first.shape


def test_history_is_kept_across_runs_and_a_new_session_keeps_the_model(loaded):
    run_all(2, loaded)
    model = loaded.controller.world_model()
    run_all(1, loaded)
    assert [m["iteration"] for m in loaded.controller.history] == [1, 2, 3]
    page_sessions.load_session(SESSION, loaded)
    final = run_all(1, loaded)[-1]
    assert loaded.controller.world_model() is model and len(loaded.controller.history) == 4
    assert len(drawn(out(final, "plot_time"), page_outputs.SERIES_TIME)) == 4


def test_stop_ends_the_run_within_one_iteration(loaded):
    updates = []
    runner = threading.Thread(target=lambda: updates.extend(page_run.run_world_model(300, loaded)))
    runner.start()
    c = loaded.controller
    deadline = time.monotonic() + 120
    while c.status().done < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    result = page_run.stop_run(loaded)
    done_at_stop = c.status().done
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert result[0].startswith(f"**Stopped: {done_at_stop}/300**") and done_at_stop < 300
    assert out(updates[-1], "progress").startswith("**Stopped:")
    assert c.attention is not None and c.saved.iteration == done_at_stop
    final = run_all(1, loaded)[-1]  # the model is consistent: the next run works
    assert out(final, "progress").startswith("**Done: 1/1**")


def test_a_run_the_queue_cancelled_stops_and_is_finished(loaded, env):
    run = page_run.run_world_model(50, loaded)
    next(run)
    next(run, None)  # at least one more update: some iterations ran
    run.close()  # what Gradio does on cancels=[...] (GeneratorExit at the yield)
    c = loaded.controller  # the training thread ends after its current iteration and finishes the run
    result = page_run.stop_run(loaded)
    assert c.saved.ok and c.attention is not None and env.is_file()
    assert result[page_outputs.RUN_OUTPUT_KEYS.index("attn_image")] is not None
    assert result[0].startswith(f"**Stopped: {c.status().done}/50**")


def test_a_slider_moved_during_a_run_is_kept_when_the_run_ends(loaded):
    c = loaded.controller
    run = page_run.run_world_model(6, loaded)
    next(run)
    page_sessions.update_frame(17, loaded)  # the user drags the slider while the run goes
    final = list(run)[-1]
    assert out(final, "frame_slider").value == 17 and c.start_frame == 17
    run_all(1, loaded)
    assert c.world_model().robot.index == 18  # the next run replayed from frame 17


def test_stop_right_before_the_run_starts_stops_it_and_shows_the_loaded_models_step(loaded, env):
    run_all(3, loaded)
    saved_step = loaded.controller.saved.step
    tab = page_common.UserState()
    page_sessions.load_session(SESSION, tab)
    answers = []
    stopper = threading.Thread(target=lambda: answers.append(page_run.stop_run(tab)))
    stopper.start()  # Stop reaches the server first: nothing runs yet
    time.sleep(0.1)
    final = run_all(50, tab)[-1]
    stopper.join(30)
    assert out(final, "progress").startswith("**Stopped: 0/50**")
    assert f"model step {saved_step}, iteration 3" in out(final, "progress")
    assert answers[0][0].startswith("**Stopped: 0/50**")


def test_refused_checkpoint_is_reported_kept_aside_and_replaced(loaded, env):
    env.parent.mkdir(parents=True)
    env.write_bytes(b"not a checkpoint")
    updates = run_all(1, loaded)
    assert out(updates[0], "checkpoint").startswith("**Checkpoint refused:**")
    final = out(updates[-1], "checkpoint")
    assert "**Checkpoint refused:**" in final and "The refused file was kept as" in final
    kept = list(env.parent.glob("autoencoder.refused-*.pth"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"not a checkpoint"
    fresh = page_common.UserState()
    page_sessions.load_session(SESSION, fresh)
    assert out(run_all(1, fresh)[0], "checkpoint").startswith("**Checkpoint:** loaded")


# -----------------------------------------------------------------------------
# attention


def test_attention_messages_before_a_run_and_for_empty_selections(loaded):
    image, md = page_attention.update_attention_viz(95, *ALL_ON, "mean", attention_viz.VIZ_LINES, loaded)
    assert image is None and md == page_outputs.NOTHING_RUN_YET
    run_all(2, loaded)
    image, md = page_attention.update_attention_viz(95, False, False, False, False, False, True, True, True, True, "mean",
                                         attention_viz.VIZ_LINES, loaded)
    assert image is None and "Select at least one decoder layer" in md
    image, md = page_attention.update_attention_viz(95, *(True,) * 5, *(False,) * 4, "sum", attention_viz.VIZ_HEATMAP, loaded)
    assert image is None and "Select at least one attention head" in md
    assert "Aggregation must be one of: mean, max, sum" in error_message(
        page_attention.update_attention_viz, 95, *ALL_ON, "median", attention_viz.VIZ_LINES, loaded)
    assert "Visualization type must be one of" in error_message(
        page_attention.update_attention_viz, 95, *ALL_ON, "mean", "3D", loaded)
    assert "Decoder layer 2 checkbox must be true or false" in error_message(
        page_attention.update_attention_viz, 95, True, True, "yes", True, True, True, True, True, True, "mean", attention_viz.VIZ_LINES, loaded)


def test_attention_redraws_from_the_cache_in_under_300_ms(loaded):
    run_all(2, loaded)  # the second iteration makes the first prediction, whose attention is captured
    step = loaded.controller.world_model().step
    pictures = {}
    for viz in attention_viz.VIZ_TYPES:
        for aggregation in attention_viz.AGGREGATIONS:
            times = []
            for _ in range(3):
                started = time.perf_counter()
                image, md = page_attention.update_attention_viz(90, *ALL_ON, aggregation, viz, loaded)
                times.append(time.perf_counter() - started)
            assert statistics.median(times) < 0.3, (viz, aggregation, times)
            assert image.dtype == np.uint8 and "connections" in md
            pictures[viz, aggregation] = (image.tobytes(), md)
    for viz in attention_viz.VIZ_TYPES:  # sum is mean x heads, so only its statistics (weight sum) differ
        assert pictures[viz, "max"][0] != pictures[viz, "mean"][0]
        assert pictures[viz, "sum"][1] != pictures[viz, "mean"][1]
    assert pictures[attention_viz.VIZ_LINES, "mean"][0] != pictures[attention_viz.VIZ_HEATMAP, "mean"][0]
    assert loaded.controller.world_model().step == step  # no training happened


def test_a_redraw_checks_its_quantile_once(loaded, monkeypatch):
    import attention_viz

    run_all(2, loaded)
    calls = []
    for module, name in ((page_attention, "parse_quantile"), (attention_viz, "_check_quantile")):
        check = getattr(module, name)
        monkeypatch.setattr(module, name, lambda q, check=check, name=name: (calls.append(name), check(q))[1])
    image, _ = page_attention.update_attention_viz(90, *ALL_ON, "mean", attention_viz.VIZ_HEATMAP, loaded)
    assert image is not None and calls == ["parse_quantile"]


def test_attention_controls_follow_the_configured_decoder_depth_and_heads(env):
    small = dataclasses.replace(page_common.MODEL_CFG, embed_dim=32, decoder_embed_dim=32, decoder_depth=3, decoder_num_heads=2,
                                decoder_position="canvas")
    demo = app.build_demo(config=small)
    ids = {b.elem_id for b in demo.blocks.values() if isinstance(b, gr.Checkbox)}
    assert ids == {"attn-layer-0", "attn-layer-1", "attn-layer-2", "attn-head-0", "attn-head-1"}
    viz = next(fn for fn in demo.fns.values() if fn.api_name == "update_attention_viz")
    assert len(viz.inputs) == 1 + 3 + 2 + 2 + 1  # quantile, layers, heads, aggregation, type, state
    user = page_common.UserState(config=small)
    page_sessions.load_session(SESSION, user)
    run_all(2, user)
    image, md = page_attention.update_attention_viz(90, True, False, True, False, True, "max", attention_viz.VIZ_LINES, user)
    assert image is not None and user.attention_controls[1:3] == ((0, 2), (1,))
    assert "Expected 3 layer and 2 head checkboxes" in error_message(
        page_attention.update_attention_viz, 90, *ALL_ON, "mean", attention_viz.VIZ_LINES, user)


# -----------------------------------------------------------------------------
# tab clean-up


def test_closing_a_tab_frees_its_model(loaded):
    run_all(1, loaded)
    registry = page_common.TabRegistry()
    request = types.SimpleNamespace(session_hash="tab-1")
    assert registry.register(loaded, request) is loaded
    registry.release(request)
    c = loaded.controller
    assert not c.has_model and c.attention is None and c.stop_event.is_set()
    registry.release(request)  # a second unload is harmless


def test_state_copies_are_fresh_and_independent(loaded):
    import copy

    twin = copy.deepcopy(loaded)
    assert twin.controller is not loaded.controller and twin.controller.session is None
    assert not twin.controller.has_model and twin.controller.stop_event is not loaded.controller.stop_event


# -----------------------------------------------------------------------------
# command line and launch


def test_share_without_auth_is_refused_with_an_explanation(capsys):
    assert app.main(["--share"]) == 2
    err = capsys.readouterr().err
    assert "--auth" in err and "--public" in err
    args = app.build_parser().parse_args(["--share", "--public"])
    assert app.share_refusal(args) is None
    assert app.share_refusal(app.build_parser().parse_args(["--share", "--auth", "u:p"])) is None


def test_flags_default_to_the_gradio_environment_variables(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7999, False, None)
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    monkeypatch.delenv("GRADIO_SERVER_PORT")
    assert app.build_parser().parse_args([]).port == 7860
    assert app.build_parser().parse_args(["--auth", "ann:secret"]).auth == ("ann", "secret")
    for bad in (["--port", "0"], ["--port", "http"], ["--auth", "nopassword"], ["--auth", ":pw"]):
        with pytest.raises(SystemExit):
            app.build_parser().parse_args(bad)


def test_learning_rate_and_gradient_graphs_plot_training_iterations_and_the_clip_line_only_when_near():
    rows = [{"iteration": 1, "lr": None, "grad_norm": None}, {"iteration": 2, "lr": 1e-4, "grad_norm": 0.02},
            {"iteration": 3, "lr": 2e-4, "grad_norm": 0.03}]
    *_, lr, grad = page_outputs.metric_frames(rows, grad_clip=1.0)
    lr = drawn(lr, page_outputs.SERIES_LR)
    assert list(lr["iteration"]) == [2, 3] and list(lr["value"]) == [1e-4, 2e-4]
    lines = grad.dropna()
    lines = lines[lines.series != page_outputs.SERIES_SPAN]
    assert list(lines["series"]) == [page_outputs.SERIES_GRAD] * 2  # norms far below the threshold: no clip line
    rows.append({"iteration": 4, "lr": 3e-4, "grad_norm": 0.7})
    clip = drawn(page_outputs.metric_frames(rows, grad_clip=1.0)[-1], page_outputs.SERIES_CLIP)
    assert list(clip["iteration"]) == [2, 4] and list(clip["value"]) == [1.0, 1.0]  # across the trained iterations
    assert page_outputs.SERIES_CLIP not in set(page_outputs.metric_frames(rows, grad_clip=0.0)[-1].dropna()["series"])  # clipping off


def test_browser_opens_only_where_there_is_a_display(monkeypatch):
    monkeypatch.setattr(app.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not app.should_open_browser(False)
    monkeypatch.setenv("DISPLAY", ":0")
    assert app.should_open_browser(False) and not app.should_open_browser(True)
    monkeypatch.delenv("DISPLAY")
    monkeypatch.setattr(app.sys, "platform", "darwin")
    assert app.should_open_browser(False)


def test_demo_sessions_are_recorded_only_when_none_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "SESSIONS_ROOT", tmp_path / "sessions")
    paths = app.ensure_demo_sessions()
    assert len(paths) == len(page_common.APP.demo_sessions) and "recording 3 demo sessions" in capsys.readouterr().out
    names, _ = page_sessions.refresh_sessions()
    assert len(names.choices) == 3
    assert app.ensure_demo_sessions() == []


def test_launch_works_inside_a_running_event_loop(env):
    args = app.build_parser().parse_args(["--host", "127.0.0.1", "--port", str(free_port()), "--no-browser"])

    async def in_a_notebook():
        demo = app.launch(app.build_demo(), args, block=False)
        try:
            with urllib.request.urlopen(demo.local_url, timeout=10) as response:
                return response.status
        finally:
            demo.close()

    assert asyncio.run(in_a_notebook()) == 200


def test_export_csv_keeps_every_metric_with_missing_values_empty_and_infinities_as_text():
    from run_export import history_csv

    text = history_csv([{"step": 0, "iteration": 1, "dot_error": None},
                        {"iteration": 2, "step": 1, "dot_error": float("inf"), "grad_norm": 0.25}])
    assert text.splitlines() == ["iteration,step,dot_error,grad_norm", "1,0,,", "2,1,inf,0.25"]


def test_an_export_right_after_a_checkpoint_load_keeps_the_csv_header_and_says_what_is_missing(loaded):
    """After a load the model has no views, attention or history in this tab: the zip's metrics.csv
    still names its columns, and the note under the file says what is not in the zip yet."""
    import zipfile

    import page_workflow
    from autoencoder_concat_predictor_world_model import METRIC_KEYS
    run_all(3, loaded)
    page_workflow.save_checkpoint("for-export", loaded)
    page_workflow.load_checkpoint("for-export", loaded)
    with zipfile.ZipFile(page_workflow.export_results(loaded)) as zf:
        assert zf.read("metrics.csv").decode().splitlines() == [",".join(METRIC_KEYS)]
        assert not [n for n in zf.namelist() if n.endswith(".png")]
    note = page_workflow.export_info(loaded)
    assert "0 of 8 pictures" in note and "**Not in the zip yet:**" in note
    for missing in ("training views", "prediction views", "attention picture", "metrics.csv holds its header only"):
        assert missing in note, missing
    run_all(4, loaded)  # the first two iterations after a load have no history to predict or train from
    with zipfile.ZipFile(page_workflow.export_results(loaded)) as zf:
        rows = zf.read("metrics.csv").decode().splitlines()
    assert rows[0].startswith(",".join(METRIC_KEYS)) and len(rows) == 5
    assert "8 of 8 pictures" in page_workflow.export_info(loaded) and "Not in the zip" not in page_workflow.export_info(loaded)


def test_a_loop_iteration_records_exactly_the_exported_metric_columns(loaded):
    from autoencoder_concat_predictor_world_model import METRIC_KEYS
    run_all(2, loaded)
    assert tuple(loaded.controller.history[-1])[:len(METRIC_KEYS)] == METRIC_KEYS
    assert set(loaded.controller.history[-1]) - set(METRIC_KEYS) <= {"replay_looped"}
