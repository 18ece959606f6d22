"""API tests: gradio_client against the real app, launched as a subprocess (see conftest.app_server).

Every endpoint is called by its fixed api_name with real recorded sessions; images come back as PNG
files and are decoded; bad inputs must fail with a message that names the problem and leave the
tab's state as it was.
"""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from concat_world_model_explorer_gradio import CANVAS_OUTPUT_KEYS, RUN_OUTPUT_KEYS
from conftest import (
    ALL_ON, ALT, ALT_FRAMES, APP_SESSIONS, AUTH_PASSWORD, AUTH_USER, BROKEN_SESSION, HEATMAP, LINES, MOVE, connect,
    error_of, load, png, points, run,
)

# output positions of /run_world_model and /stop (the state output is not part of the API)
PROGRESS, CHECKPOINT, T_ORIGINAL, T_MASKED, T_INPAINT, T_COMPOSITE = (RUN_OUTPUT_KEYS.index(k) for k in (
    "progress", "checkpoint", "train_original", "train_masked", "train_inpainting", "train_composite"))
P_CURRENT, P_NEXT, P_ERROR, P_INFO, PLOT_ERROR, PLOT_TIME, PLOT_LOSS, PLOT_DOT, ATTN_IMAGE, ATTN_STATS, SLIDER = (
    RUN_OUTPUT_KEYS.index(k) for k in ("pred_current", "pred_next", "pred_error", "prediction_info", "plot_error",
                                       "plot_time", "plot_loss", "plot_dot", "attn_image", "attn_stats", "frame_slider"))


# -----------------------------------------------------------------------------
# helpers


def white_pixels(image: np.ndarray) -> int:
    return int((image.min(axis=2) >= 250).sum())


def digest(path) -> str:
    return hashlib.sha256(png(path).tobytes()).hexdigest()


# -----------------------------------------------------------------------------
# sessions and frames


def test_refresh_lists_loadable_sessions_and_explains_broken_ones(client):
    dropdown, broken = client.predict(api_name="/refresh_sessions")
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in dropdown["choices"]]
    assert set(APP_SESSIONS) <= set(choices) and BROKEN_SESSION not in choices
    assert dropdown["value"] in choices
    plain = broken.replace("\\", "")
    assert f"{BROKEN_SESSION}: {BROKEN_SESSION}/session_meta.json is missing" in plain


def test_load_shows_the_session_metadata_and_its_first_frame(client):
    info, slider, frame, frame_md, jump = load(client)
    for text in (f"**Frames:** {ALT_FRAMES}", f"**Actions:** {ALT_FRAMES - 1}", "**Start:**", "**End:**",
                 "**Robot:** ToroidalDotRobot", "**Action space:** 0 = stay, 1 = move right"):
        assert text in info
    assert slider["maximum"] == ALT_FRAMES - 1 and slider["value"] == 0 and jump == 0
    image = png(frame)
    assert image.shape == (448, 448, 3) and white_pixels(image) > 100  # the dot, at 2x
    assert "**Frame 0**" in frame_md


def test_a_broken_session_is_refused_with_its_reason(client):
    message = error_of(client, BROKEN_SESSION, api_name="/load_session")
    assert f"Cannot load session {BROKEN_SESSION}" in message and "session_meta.json is missing" in message


def test_slider_and_jump_show_step_timestamp_and_action(client):
    load(client)
    frame, frame_md, number = client.predict(7, api_name="/update_frame")
    assert number == 7  # the Frame number box follows the slider
    image = png(frame)
    assert white_pixels(image) > 100
    assert "**Frame 7**" in frame_md and "**Step:** 14" in frame_md and "**Time:** 20" in frame_md
    assert "**Action after it:** 1 = move right" in frame_md  # alternate: stay, move, stay, ...
    slider, frame, frame_md = client.predict(ALT_FRAMES - 1, api_name="/jump_to_frame")
    assert slider["value"] == ALT_FRAMES - 1 and "none (the last frame)" in frame_md
    assert not np.array_equal(png(frame), image)  # the dot moved


# -----------------------------------------------------------------------------
# running


def test_run_five_iterations_streams_and_fills_every_view(client, app_server):
    load(client, MOVE)
    job = client.submit(5, api_name="/run_world_model")
    final = job.result(timeout=300)
    assert final[PROGRESS].startswith("**Done: 5/5**")
    assert len(job.outputs()) >= 2  # the first update, then the final state
    for key in (T_ORIGINAL, T_MASKED, T_INPAINT, T_COMPOSITE, P_CURRENT, P_NEXT, P_ERROR):
        image = png(final[key])
        assert image.max() > 0, key  # not black
    assert png(final[T_ORIGINAL]).shape == (224, 688, 3)
    assert white_pixels(png(final[P_CURRENT])) > 100
    assert len(points(final[PLOT_TIME])) == 5
    assert len(points(final[PLOT_ERROR], "model prediction")) == 3  # a prediction needs 2 frames first
    assert len(points(final[PLOT_LOSS], "training loss (weighted)")) == 3
    assert len(points(final[PLOT_DOT])) == 3  # one rolling within-3-px share per scored prediction
    assert "**Prediction error of the current frame (MSE):**" in final[P_INFO] and "amplified x" in final[P_INFO]
    # the error map's updates are pictures only: an update that changed its label would make Gradio
    # rebuild the component's settings twice a second, out of the training's CPU
    assert not any(isinstance(out[P_ERROR], dict) for out in job.outputs())
    assert png(final[ATTN_IMAGE]).shape[1] == 688 * 2 and "connections" in final[ATTN_STATS]  # the lines view at 2x
    assert "**Saved** to `<checkpoints>/autoencoder.pth`" in final[CHECKPOINT]
    assert str(app_server.saved_root) not in final[CHECKPOINT]  # the page never shows the server's folders
    assert (app_server.saved_root / "checkpoints" / "toroidal_dot" / "autoencoder.pth").is_file()
    assert final[SLIDER]["value"] == 5
    again = run(client, 2)  # the history is kept across runs of the same model
    assert len(points(again[PLOT_TIME])) == 7


def test_stop_ends_a_long_run_early_and_the_next_run_works(client):
    load(client)
    job = client.submit(200, api_name="/run_world_model")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        outputs = job.outputs()
        if outputs and outputs[-1][PROGRESS].startswith("**Running:") and "**Running: 0/" not in outputs[-1][PROGRESS]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the run never streamed progress")
    started = time.monotonic()
    stopped = client.predict(api_name="/stop")
    assert time.monotonic() - started < 30
    done = int(stopped[PROGRESS].split("**Stopped: ")[1].split("/")[0])
    assert 1 <= done < 100
    assert job.result(timeout=60)[PROGRESS].startswith(f"**Stopped: {done}/200**")
    assert "connections" in stopped[ATTN_STATS]
    assert run(client, 2)[PROGRESS].startswith("**Done: 2/2**")


def test_two_tabs_train_independent_models_at_once(app_server, tmp_path):
    clients = [connect(app_server.url, tmp_path / str(i)) for i in range(2)]
    try:
        load(clients[0], ALT)
        load(clients[1], MOVE)
        jobs = [c.submit(n, api_name="/run_world_model") for c, n in zip(clients, (3, 4))]
        results = [job.result(timeout=300) for job in jobs]
    finally:
        for c in clients:
            c.close()
    assert results[0][PROGRESS].startswith("**Done: 3/3**") and results[1][PROGRESS].startswith("**Done: 4/4**")
    assert [len(points(r[PLOT_TIME])) for r in results] == [3, 4]


def test_attention_in_both_modes_and_all_aggregations_redraws_without_training(client):
    load(client)
    before = run(client, 3)
    step = before[PROGRESS].split("model step ")[1]
    pictures = {}
    for viz in (LINES, HEATMAP):
        for aggregation in ("mean", "max", "sum"):
            started = time.monotonic()
            image, stats = client.predict(90, *ALL_ON, aggregation, viz, api_name="/update_attention_viz")
            assert time.monotonic() - started < 5
            assert "connections" in stats and "| Layer |" in stats and "| Head (dominant) |" in stats
            assert "min | p25 | median | p75 | max" in stats
            pictures[viz, aggregation] = (digest(image), stats)
    for viz in (LINES, HEATMAP):
        assert pictures[viz, "max"][0] != pictures[viz, "mean"][0]
        assert pictures[viz, "sum"][1] != pictures[viz, "mean"][1]  # same picture (sum = 4 x mean), other sums
    assert pictures[LINES, "mean"][0] != pictures[HEATMAP, "mean"][0]
    few, _ = client.predict(99, *ALL_ON, "mean", LINES, api_name="/update_attention_viz")
    assert digest(few) != pictures[LINES, "mean"][0]
    one_layer, stats = client.predict(90, True, False, False, False, False, True, True, True, True, "mean", LINES,
                                      api_name="/update_attention_viz")
    assert "| L0 |" in stats and "| L1 |" not in stats
    image, stats = client.predict(90, *(False,) * 5, *(True,) * 4, "mean", LINES, api_name="/update_attention_viz")
    assert image is None and "Select at least one decoder layer" in stats
    image, stats = client.predict(90, *(True,) * 5, *(False,) * 4, "mean", LINES, api_name="/update_attention_viz")
    assert image is None and "Select at least one attention head" in stats
    after = client.predict(api_name="/stop")  # nothing running: shows the model as it is
    assert after[PROGRESS].split("model step ")[1] == step


def test_attention_before_any_run_says_so(client):
    image, stats = client.predict(95, *ALL_ON, "mean", LINES, api_name="/update_attention_viz")
    assert image is None and "run the world model once" in stats


# -----------------------------------------------------------------------------
# bad inputs: a clear message, nothing runs, the state stays as it was


@pytest.fixture(scope="module")
def trained(app_server, tmp_path_factory):
    """One client with a session loaded, frame 4 selected and one iteration run."""
    c = connect(app_server.url, tmp_path_factory.mktemp("bad-inputs"))
    load(c)
    c.predict(4, api_name="/update_frame")
    c.state_before = run(c, 1)[PROGRESS]
    yield c
    c.close()


@pytest.mark.parametrize("value", [0, -1, 501, 10**12, float("nan"), float("inf"), float("-inf"), None, "abc",
                                   "5", 3.5, True])
def test_bad_iteration_counts_are_refused(trained, value):
    message = error_of(trained, value, api_name="/run_world_model")
    assert "Number of iterations must be a whole number from 1 to 500" in message


@pytest.mark.parametrize("value", [-1, ALT_FRAMES, 2.5, float("nan"), "3", None, True])
def test_bad_frame_numbers_are_refused(trained, value):
    assert f"Frame index must be a whole number from 0 to {ALT_FRAMES - 1}" in error_of(
        trained, value, api_name="/update_frame")
    assert f"Frame number must be a whole number from 0 to {ALT_FRAMES - 1}" in error_of(
        trained, value, api_name="/jump_to_frame")


@pytest.mark.parametrize("value", [-0.5, 100.5, float("nan"), float("inf"), "high", None, False])
def test_bad_quantiles_are_refused(trained, value):
    message = error_of(trained, value, *ALL_ON, "mean", LINES, api_name="/update_attention_viz")
    assert "Quantile must be a number from 0 to 100" in message


@pytest.mark.parametrize("args, expected", [
    ((95, *ALL_ON, "median", LINES), "Aggregation must be one of: mean, max, sum"),
    ((95, *ALL_ON, "mean", "3D"), "Visualization type must be one of: Patch-to-Patch Lines, Heatmap"),
    ((95, "yes", *(True,) * 8, "mean", LINES), "Decoder layer 0 checkbox must be true or false"),
    ((95, *(True,) * 5, None, True, True, True, "mean", LINES), "Attention head 0 checkbox must be true or false"),
])
def test_bad_attention_controls_are_refused(trained, args, expected):
    assert expected in error_of(trained, *args, api_name="/update_attention_viz")


@pytest.mark.parametrize("name", ["", None])  # hostile names: test_security_api.py and test_sessions.py
def test_loading_without_a_choice_asks_for_one(trained, name):
    assert "Choose a session in the list first" in error_of(trained, name, api_name="/load_session")


def test_after_the_bad_inputs_the_state_is_unchanged_and_valid_calls_work(trained):
    iteration = int(trained.state_before.split("iteration ")[-1])
    final = run(trained, 1)
    assert final[PROGRESS].startswith("**Done: 1/1**")
    assert int(final[PROGRESS].split("iteration ")[-1]) == iteration + 1  # no bad call trained the model
    assert final[SLIDER]["value"] == 6  # started at frame 4 (kept), moved 1 + 1 iterations
    frame, frame_md, _ = trained.predict(3, api_name="/update_frame")
    assert "**Frame 3**" in frame_md and f"of 0-{ALT_FRAMES - 1}" in frame_md  # still the same session
    image, stats = trained.predict(95, *ALL_ON, "mean", LINES, api_name="/update_attention_viz")
    assert image is not None and "connections" in stats


def test_running_before_loading_asks_to_load_a_session_first(client):
    assert "Load a session first" in error_of(client, 5, api_name="/run_world_model")
    assert "Load a session first" in error_of(client, 0, api_name="/update_frame")


# -----------------------------------------------------------------------------
# analysis (section 7) and patch attention: the tab's model answers, only single-canvas training changes it


def model_counters(c: Client) -> tuple[int, int]:
    """(step, iteration) of the client's model, read through /stop (nothing running: it only reports)."""
    progress = c.predict(api_name="/stop")[PROGRESS]
    return tuple(map(int, re.search(r"model step (\d+), iteration (\d+)", progress).groups()))


@pytest.fixture(scope="module")
def analysed(app_server, tmp_path_factory):
    """One client with the alternate session loaded and 3 iterations run."""
    c = connect(app_server.url, tmp_path_factory.mktemp("analysis"))
    load(c)
    run(c, 3)
    yield c
    c.close()


def test_counterfactual_shows_both_actions_beside_the_recorded_frame(analysed):
    before = model_counters(analysed)
    stay, move, actual, text = analysed.predict(6, api_name="/counterfactual")
    assert model_counters(analysed) == before  # asking never trains
    assert png(stay["value"]).shape == png(move["value"]).shape == png(actual).shape == (448, 448, 3)
    # alternate records stay after even frames: frame 6 -> stay is the recorded action
    assert stay["label"] == "Frame 7 if stay (recorded)" and move["label"] == "Frame 7 if move right"
    assert actual["label"] == "Actual frame 7"
    assert "the recorded action after frame 6 was **stay**" in text and "| stay (recorded) |" in text
    frame7, _, _ = analysed.predict(7, api_name="/update_frame")
    np.testing.assert_array_equal(png(actual), png(frame7))  # the actual picture is recorded frame 7


def test_rollout_table_has_one_row_per_step_and_the_strip_three_rows(analysed):
    before = model_counters(analysed)
    strip, table, text = analysed.predict(2, 3, api_name="/rollout")
    assert model_counters(analysed) == before
    assert png(strip["value"]).shape == (3 * 224 + 2 * 4, 3 * 224 + 2 * 4, 3)  # actual / predicted / error x 3 steps
    assert "rows actual, predicted, |error|" in strip["label"]
    assert [row[:3] for row in table["data"]] == [[1, 3, "stay"], [2, 4, "move right"], [3, 5, "stay"]]
    assert table["headers"][3:5] == ["model MSE", "copy MSE (frame t repeated)"]
    assert "**3 steps imagined from frame 2**" in text


def test_evaluate_session_reports_stays_and_moves_and_plots_every_transition(analysed):
    before = model_counters(analysed)
    text, plot = analysed.predict(MOVE, api_name="/evaluate_session")
    text = text.replace("\\", "")  # markdown escapes the underscores of the name
    assert model_counters(analysed) == before
    frames = APP_SESSIONS[MOVE][1] + 1
    assert f"**Session {MOVE}**: {frames - 2} transitions predicted by the model step {before[0]}" in text
    assert f"| all | {frames - 2} |" in text and "| after stay | 0 |" in text and f"| after move right | {frames - 2} |" in text
    plot = plot["value"] if plot.get("__type__") == "update" else plot  # an update: it also lays the graph out again
    rows = [dict(zip(plot["columns"], r)) for r in plot["data"] if r[0] is not None]
    assert len(rows) == 2 * (frames - 2)  # model and repeat-frame baseline per transition
    assert {r["series"] for r in rows} == {"model, after move", "baseline: repeat frame t"}


def test_patch_attention_names_the_patch_and_draws_one_panel_per_layer(analysed):
    image, text, picker = analysed.predict(4, 9, api_name="/patch_attention")
    picture = png(image)
    assert picture.shape[1] == 2 * 688 + 6 and picture.shape[0] > 3 * 224  # five canvases, two to a row
    ring = png(picker)[4 * 32:5 * 32, 9 * 32:10 * 32]  # patch (4, 9) of the 2x predicted frame
    assert (ring[0] == (0, 255, 255)).all() and (ring[-1] == (0, 255, 255)).all()  # ringed in cyan
    assert "Patch (row 4, col 9) of the predicted frame" in text and "| L4 |" in text


def test_single_canvas_training_streams_and_trains_this_tabs_model(analysed):
    step, iteration = model_counters(analysed)
    job = analysed.submit(5, 5, api_name="/train_single_canvas")
    final = job.result(timeout=120)
    at = {key: CANVAS_OUTPUT_KEYS.index(key) for key in CANVAS_OUTPUT_KEYS}  # output positions
    progress, plot = final[at["canvas_progress"]], final[at["canvas_plot"]]
    assert progress.startswith("**Done: 5/5** steps on the canvas ending at frame 5")
    assert len(points(plot, "training loss (weighted)")) == 5
    assert png(final[at["train_original"]]).shape == (224, 688, 3)  # the training views show that canvas
    assert "**Saved**" in final[at["checkpoint"]]
    assert model_counters(analysed) == (step + 5, iteration)  # steps taken, no loop iteration


@pytest.mark.parametrize("value", [0, ALT_FRAMES - 1, -3, 2.5, float("nan"), "3", None, True])
def test_bad_analysis_frames_are_refused(analysed, value):
    rule = f"Frame index must be a whole number from 1 to {ALT_FRAMES - 2}"
    assert rule in error_of(analysed, value, api_name="/counterfactual")
    assert rule in error_of(analysed, value, 3, api_name="/rollout")


@pytest.mark.parametrize("args, expected", [
    ((3, 0), "Steps k must be a whole number from 1 to 20"),
    ((3, 21), "Steps k must be a whole number from 1 to 20"),
    ((3, float("nan")), "Steps k must be a whole number from 1 to 20"),
    ((ALT_FRAMES - 3, 5), f"Steps k (frame {ALT_FRAMES - 3} + k must exist) must be a whole number from 1 to 2"),
])
def test_bad_rollout_lengths_are_refused(analysed, args, expected):
    assert expected in error_of(analysed, *args, api_name="/rollout")


@pytest.mark.parametrize("args, expected", [
    ((5, 0), "Steps must be a whole number from 1 to 200"),
    ((5, 201), "Steps must be a whole number from 1 to 200"),
    ((5, 10**9), "Steps must be a whole number from 1 to 200"),
    ((5, float("inf")), "Steps must be a whole number from 1 to 200"),
    ((1, 5), f"Frame index must be a whole number from 2 to {ALT_FRAMES - 1}"),
    (("x", 5), f"Frame index must be a whole number from 2 to {ALT_FRAMES - 1}"),
])
def test_bad_single_canvas_requests_are_refused(analysed, args, expected):
    assert expected in error_of(analysed, *args, api_name="/train_single_canvas")


@pytest.mark.parametrize("args, expected", [
    ((14, 0), "Patch row must be a whole number from 0 to 13"),
    ((-1, 0), "Patch row must be a whole number from 0 to 13"),
    ((0, 14), "Patch column must be a whole number from 0 to 13"),
    ((0, float("nan")), "Patch column must be a whole number from 0 to 13"),
    (("2", 3), "Patch row must be a whole number from 0 to 13"),
])
def test_bad_patches_are_refused(analysed, args, expected):
    assert expected in error_of(analysed, *args, api_name="/patch_attention")


@pytest.mark.parametrize("name, expected", [
    ("../escape", "Unknown session"), ("nope", "Unknown session"), ("", "Choose a session in the list first"),
    (None, "Choose a session in the list first"), (BROKEN_SESSION, "session_meta.json is missing"),
])
def test_bad_sessions_to_evaluate_are_refused(analysed, name, expected):
    assert expected in error_of(analysed, name, api_name="/evaluate_session")


def test_analysis_before_a_session_or_a_run_says_what_is_missing(client):
    assert "Load a session first" in error_of(client, 3, api_name="/counterfactual")
    assert "Load a session first" in error_of(client, 3, 2, api_name="/rollout")
    assert "Load a session first" in error_of(client, 3, 2, api_name="/train_single_canvas")
    assert "Run the world model first" in error_of(client, 3, 3, api_name="/patch_attention")


# -----------------------------------------------------------------------------
# workflow (section 8): record, named checkpoints, reset, export, run history


def test_record_session_from_the_page_writes_a_new_session_and_selects_it(client, app_server):
    sessions = app_server.saved_root / "sessions" / "toroidal_dot"
    before = {p.name for p in sessions.iterdir()}
    job = client.submit("random", 5, 7, 4, 20, api_name="/record_session")
    text, dropdown, evaluation = job.result(timeout=120)
    new = {p.name for p in sessions.iterdir()} - before
    assert len(new) == 1
    name = new.pop()
    assert "**Recorded** session" in text and "6 frames, pattern random, seed 7, dot radius 4 px, move 20 px" in text
    assert dropdown["value"] == name == evaluation["value"] and f"session `{name}`:" in text  # no escapes in code
    assert name in [ch[0] if isinstance(ch, (list, tuple)) else ch for ch in dropdown["choices"]]
    assert len(list((sessions / name / "frames").glob("*.png"))) == 6
    info = load(client, name)[0]
    assert "**Frames:** 6" in info


@pytest.mark.parametrize("args, expected", [
    (("spiral", 5, 0, 5, 27), "Pattern must be one of: always_move"),
    (("random", 2, 0, 5, 27), "Steps must be a whole number from 3 to 10000"),
    (("random", 10**9, 0, 5, 27), "Steps must be a whole number from 3 to 10000"),
    (("random", float("nan"), 0, 5, 27), "Steps must be a whole number from 3 to 10000"),
    (("random", 5, -1, 5, 27), "Seed must be a whole number from 0 to 4294967295"),
    (("random", 5, 0, 0, 27), "Dot radius must be a whole number from 1 to 50"),
    (("random", 5, 0, 51, 27), "Dot radius must be a whole number from 1 to 50"),
    (("random", 5, 0, 5, 224), "Move pixels must be a whole number from 0 to 223"),
    (("random", 5, 0, 5, "27"), "Move pixels must be a whole number from 0 to 223"),
])
def test_bad_recordings_are_refused_and_write_nothing(client, app_server, args, expected):
    sessions = app_server.saved_root / "sessions" / "toroidal_dot"
    before = sorted(p.name for p in sessions.iterdir())
    assert expected in error_of(client, *args, api_name="/record_session")
    assert sorted(p.name for p in sessions.iterdir()) == before


def test_named_checkpoints_save_once_list_and_load_into_another_tab(app_server, tmp_path):
    folder = app_server.saved_root / "checkpoints" / "toroidal_dot"
    a, b = connect(app_server.url, tmp_path / "a"), connect(app_server.url, tmp_path / "b")
    try:
        load(a)
        run(a, 4)
        step, iteration = model_counters(a)
        table, choices = a.predict("api-ckpt", api_name="/save_checkpoint")
        assert f"**Saved** `api-ckpt.pth` (step {step}, iteration {iteration})" in table
        assert f"| api-ckpt | {step} | {iteration} |" in table and f"| {ALT.replace('_', chr(92) + '_')} |" in table
        assert choices["value"] == "api-ckpt" and (folder / "api-ckpt.pth").is_file()
        before = (folder / "api-ckpt.pth").read_bytes()
        assert "already exists" in error_of(a, "api-ckpt", api_name="/save_checkpoint")
        assert (folder / "api-ckpt.pth").read_bytes() == before  # never replaced
        load(b, MOVE)
        loaded = b.predict("api-ckpt", api_name="/load_checkpoint")
        assert "**Loaded** `api-ckpt.pth`" in loaded[0] and model_counters(b) == (step, iteration)
        assert run(b, 1)[PROGRESS].startswith("**Done: 1/1**") and model_counters(b)[1] == iteration + 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("name, expected", [
    ("../escape", "Invalid checkpoint name"), ("a/b", "Invalid checkpoint name"), ("", "must be a non-empty name"),
    (None, "must be a non-empty name"), ("autoencoder", "shared checkpoint"), (".hidden", "Invalid checkpoint name"),
])
def test_bad_checkpoint_names_are_refused(trained, app_server, name, expected):
    folder = app_server.saved_root / "checkpoints" / "toroidal_dot"
    before = sorted(p.name for p in folder.iterdir())
    assert expected in error_of(trained, name, api_name="/save_checkpoint")
    assert expected in error_of(trained, name, api_name="/load_checkpoint")
    assert sorted(p.name for p in folder.iterdir()) == before


def test_loading_a_missing_or_damaged_checkpoint_leaves_the_model(trained, app_server):
    folder = app_server.saved_root / "checkpoints" / "toroidal_dot"
    (folder / "damaged.pth").write_bytes(b"no checkpoint")
    before = model_counters(trained)
    assert "no checkpoint named nope" in error_of(trained, "nope", api_name="/load_checkpoint")
    assert "not a readable checkpoint" in error_of(trained, "damaged", api_name="/load_checkpoint")
    assert model_counters(trained) == before
    (folder / "damaged.pth").unlink()


def test_reset_gives_a_fresh_model_and_clears_the_graphs(client, app_server):
    files = sorted(p.name for p in (app_server.saved_root / "checkpoints" / "toroidal_dot").iterdir())
    load(client)
    run(client, 3)
    out = client.predict(api_name="/reset_model")
    assert "**Reset:**" in out[0] and "**Model reset:**" in out[1 + CHECKPOINT]
    assert out[1 + PROGRESS] == "_Not run yet with this model_ | model step 0, iteration 0"
    assert points(out[1 + PLOT_TIME]) == []
    assert sorted(p.name for p in (app_server.saved_root / "checkpoints" / "toroidal_dot").iterdir()) == files
    assert run(client, 2)[PROGRESS].startswith("**Done: 2/2**") and model_counters(client) == (0, 2)


def test_export_holds_every_view_the_metric_history_and_a_readme(client):
    import zipfile

    assert "Nothing to export yet" in error_of(client, api_name="/export")
    load(client)
    run(client, 4)
    path = client.predict(api_name="/export")
    path = path["value"] if isinstance(path, dict) else path
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert {"train_original.png", "train_masked.png", "train_inpainting.png", "train_composite.png",
                "prediction_current.png", "prediction_next.png", "prediction_error.png", "attention.png",
                "metrics.csv", "config.json", "run.json", "README.txt"} == names
        readme = zf.read("README.txt").decode()
        assert all(name in readme for name in names)
        rows = zf.read("metrics.csv").decode().splitlines()
        assert rows[0].startswith("iteration,step,prediction_error") and len(rows) == 1 + 4
        with zf.open("train_original.png") as f:
            assert Image.open(f).size == (688, 224)  # full resolution


def test_run_history_returns_the_nearest_kept_iteration(client):
    assert "No run history yet" in error_of(client, 3, api_name="/browse_history")
    load(client)
    slider = run(client, 6)[RUN_OUTPUT_KEYS.index("history_slider")]
    last = model_counters(client)[1]  # the model may have come from the shared checkpoint: count from there
    first = last - 5
    assert slider["minimum"] == first and slider["maximum"] == last and slider["value"] == last
    current, predicted, error, text = client.predict(first + 3, api_name="/browse_history")
    assert text.startswith(f"**Iteration {first + 3}** |") and png(current).shape == (448, 448, 3)
    frame, _, _ = client.predict(3, api_name="/update_frame")
    np.testing.assert_array_equal(png(current), png(frame))  # the run's 4th iteration observed frame 3
    assert client.predict(10**6, api_name="/browse_history")[3].startswith(f"**Iteration {last}** (the kept one nearest")
    for bad in (-1, float("nan"), "4", None):
        assert "Iteration must be a whole number from 0 to" in error_of(client, bad, api_name="/browse_history")


# -----------------------------------------------------------------------------
# launch options


def test_auth_protects_every_route_and_an_offline_share_keeps_serving(guarded_server, tmp_path):
    import urllib.error
    import urllib.request

    server = guarded_server
    for route in ("config", "gradio_api/info", "gradio_api/file=/etc/hostname"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.url + route, timeout=10)
        assert info.value.code == 401, route
    with pytest.raises(Exception):
        connect(server.url, tmp_path / "anonymous")
    c = connect(server.url, tmp_path / "ann", auth=(AUTH_USER, AUTH_PASSWORD))
    dropdown, _ = c.predict(api_name="/refresh_sessions")
    assert ALT in [ch[0] for ch in dropdown["choices"]]
    c.close()
    # offline (as on the project machines) the tunnel fails: the app must say so and keep serving
    outcomes = ("Still serving locally", "Running on public URL")
    deadline = time.monotonic() + 60
    while not any(o in server.log() for o in outcomes) and time.monotonic() < deadline:
        time.sleep(0.5)
    log = server.log()
    assert any(o in log for o in outcomes), log[-2000:]
    if "Still serving locally" in log:
        assert "Could not create a public share link" in log
    assert server.proc.poll() is None
    assert urllib.request.urlopen(server.url, timeout=10).status == 200


# -----------------------------------------------------------------------------
# memory: an idle client's model is parked and comes back at its next call


def test_an_idle_clients_model_is_parked_and_reloaded_transparently(guarded_server, tmp_path):
    server = guarded_server  # parks models idle for 1 s; no other test runs a model on it
    temp = server.log_path.parent / "tmp"  # its TMPDIR, where the parked files go
    c = connect(server.url, tmp_path, auth=(AUTH_USER, AUTH_PASSWORD))
    load(c, MOVE)
    first = run(c, 3)
    step, iteration = map(int, re.search(r"model step (\d+), iteration (\d+)", first[PROGRESS]).groups())
    deadline = time.monotonic() + 30
    while "parked an idle model (step" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"parked an idle model (step {step}, iteration {iteration})" in server.log()
    assert len(list(temp.glob("cwm-parked-*/*.park"))) == 1  # the model lives on disk, not in memory
    image, stats = c.predict(90, *ALL_ON, "mean", LINES, api_name="/update_attention_viz")
    assert f"reloaded a parked model (step {step}, iteration {iteration})" in server.log()  # the next call
    assert image is not None and f"after iteration {iteration}" in stats
    final = run(c, 2)
    assert f"iteration {iteration + 2}" in final[PROGRESS]  # it went on from where it was parked
    assert len(points(final[PLOT_TIME])) == 5  # and this client's history was kept
    assert first[CHECKPOINT].split("\n")[0] == final[CHECKPOINT].split("\n")[0]  # the same model's origin
    c.close()
