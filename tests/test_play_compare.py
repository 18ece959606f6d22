"""Play (the user's actions imagined open loop, beside the dot world simulated from frame t) and
comparing two models on the same frames: the engine (``world_model_analysis``), the tab's
``RunController`` and the page's handlers (``page_play``). Tiny models throughout."""

from __future__ import annotations

import threading

import gradio as gr
import numpy as np
import pytest
import torch

import config
import page_common
import page_play
import page_sessions
import world_model_analysis as wa
from conftest import TINY, FakeSession
from frame_metrics import dot_centroids
from record_session import record_session
from run_controller import RunController
from session_explorer_lib import load_session
from toroidal_action_selectors import PATTERN_NAMES

THIS_TAB = page_play.THIS_TAB


# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sessions_root(tmp_path_factory):
    """One recorded session per pattern (30 actions), radius and move varied so dots wrap and split."""
    root = tmp_path_factory.mktemp("play_sessions")
    for i, pattern in enumerate(PATTERN_NAMES):
        record_session(pattern, 30, i, name=pattern, root=root, dot_radius=3 + 4 * (i % 3), move_pixels=27 + 11 * i)
    return root


def _jittered(c: RunController) -> RunController:
    """Predictions that differ per pixel (a fresh head predicts one colour everywhere)."""
    with torch.no_grad():
        head = c.world_model().model.mae.decoder_pred
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 6 iterations on a 14-frame stay/move session that carries the dot world's metadata."""
    session = FakeSession(n=14)
    session.metadata = {"dot_radius": 5, "move_pixels": 27}  # FakeSession's robot: the defaults
    c = RunController(checkpoint_path=tmp_path_factory.mktemp("ckpt") / "autoencoder.pth", config=TINY, device="cpu")
    c.load_session(session)
    for _ in c.run(6):
        pass
    return _jittered(c)


@pytest.fixture
def user(sessions_root, tmp_path, monkeypatch) -> page_common.UserState:
    """A tab (tiny model) with the alternate session loaded, its checkpoints in a private folder."""
    monkeypatch.setattr(config, "SESSIONS_ROOT", sessions_root)
    monkeypatch.setattr(config, "CHECKPOINT_PATH", tmp_path / "checkpoints" / "autoencoder.pth")
    state = page_common.UserState(config=TINY)
    page_sessions.load_session("alternate", state)
    return state


def _message(fn, *args) -> str:
    with pytest.raises(gr.Error) as info:
        fn(*args)
    return str(info.value.message)


def _model_state(wm):
    return {k: v.clone() for k, v in wm.model.state_dict().items()}, wm.step, wm.iteration


# -----------------------------------------------------------------------------
# the world's truth


def test_the_simulated_world_equals_the_recorded_frames_under_the_recorded_actions(sessions_root):
    wrapped = split = False
    for pattern in PATTERN_NAMES:
        s = load_session(pattern, root=sessions_root)
        n = s.num_frames
        recorded = np.stack([s.frame(i) for i in range(n)])  # (n, H, W, 3)
        x = dot_centroids(recorded)[:, 0]  # (n,)
        wrapped |= bool((np.diff(x) < 0).any())  # only a wrap past the right edge moves the dot left
        split |= bool((recorded[:, :, 0].any(axis=(1, 2)) & recorded[:, :, -1].any(axis=(1, 2))).any())
        for t in (2, n // 2, n - 2):
            actions = [s.action_after(i) for i in range(t, n - 1)]
            np.testing.assert_array_equal(wa.true_frames(s, t, actions), recorded[t + 1:], err_msg=f"{pattern} from {t}")
    assert wrapped and split  # the dot crossed the edge and was drawn across it


def test_a_played_recording_shows_the_recorded_frames_as_the_truth(user):
    s = user.controller.session
    page_play.play_start(2, user)
    actions = "".join(str(s.action_after(i)) for i in range(2, 12))
    imagined, truth, strip, table, text = page_play.play(actions, user)
    np.testing.assert_array_equal(truth["value"], page_common.upscale(s.frame(12)))
    assert truth["label"] == "True frame 12 (simulated)" and imagined["label"] == "Imagined frame 12"
    assert strip["value"].shape == (3 * 224 + 2 * 4, 11 * 224 + 10 * 4, 3)  # frames 2..12, rows truth/imagined/error
    assert list(table["frame"]) == list(range(3, 13))
    assert list(table["action"]) == ["stay" if a == "0" else "move right" for a in actions]
    assert "10 of at most 50 steps" in text


def test_a_session_without_the_worlds_metadata_cannot_be_played(tmp_path):
    c = RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu")
    c.load_session(FakeSession(n=6))  # no metadata: an older recording
    with pytest.raises(ValueError, match="lacks dot_radius and move_pixels"):
        c.play_start(3)
    assert c.current_play() is None and not c.has_model


# -----------------------------------------------------------------------------
# play


def test_playing_k_steps_equals_k_chained_predictions_and_never_trains(trained):
    wm, s = trained.world_model(), trained.session
    before = _model_state(wm)
    trained.play_start(4)
    trained.play("1", 50)
    play = trained.play("10", 50)  # each call continues
    state, step, iteration = before
    assert (wm.step, wm.iteration) == (step, iteration)
    for name, value in wm.model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    p1 = wm.predict_next_frame([s.frame(3), {"action": s.action_after(3)}, s.frame(4), {"action": 1}])
    p2 = wm.predict_next_frame([s.frame(4), {"action": 1}, p1, {"action": 1}])
    p3 = wm.predict_next_frame([p1, {"action": 1}, p2, {"action": 0}])
    np.testing.assert_array_equal(np.stack(play.imagined), np.stack([p1, p2, p3]))
    assert play.actions == [1, 1, 0] and len(np.unique(p3)) > 2  # pictures, not a flat colour
    np.testing.assert_array_equal(np.stack(play.truth), wa.true_frames(s, 4, [1, 1, 0]))
    assert play.mse == pytest.approx([np.mean((p.astype(float) - q) ** 2) / 255**2 for p, q in zip(play.imagined, play.truth)])


def test_play_waits_for_a_busy_model_then_refuses_changing_nothing(user):
    c = user.controller
    page_play.play_start(3, user)
    page_play.play("1", user)
    wm, c.run_lock_wait_s = c.world_model(), 0.05
    held, release = threading.Event(), threading.Event()

    def hold():  # what a run's iteration does while it trains
        with wm.lock:
            held.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    held.wait(10)
    try:
        assert _message(page_play.play, "1", user) == page_play.MODEL_BUSY
        assert "Actions must be" in _message(page_play.play, "2", user)  # a bad request is named, busy or not
    finally:
        release.set()
        worker.join()
    assert c.current_play().steps == 1 and page_play.play("1", user)[3].shape[0] == 2


def test_bad_play_requests_are_refused_and_change_nothing(user):
    c = user.controller
    n = c.session.num_frames
    before = page_play.play_start(3, user)
    page_play.play("1", user)
    play, imagined = c.current_play(), c.current_play().imagined[0].copy()
    step = c.status().model_step
    for actions in ("12", "1" * 51, "", "1a", None, 5):
        assert "Actions must be 1-50 characters, each 0 (stay) or 1 (move right)" in _message(page_play.play, actions, user)
    assert "this play has 1 of its 50 steps; 50 more would pass that" in _message(page_play.play, "0" * 50, user)
    for frame in (0, 1, n, -1, 2.5, "3", None):
        assert f"Frame index must be a whole number from 2 to {n - 1}" in _message(page_play.play_start, frame, user)
    assert c.current_play() is play and play.steps == 1 and c.status().model_step == step
    np.testing.assert_array_equal(play.imagined[0], imagined)
    assert before[3].empty and page_play.play("0 1", user)[3].shape[0] == 3  # still playable; spaces are ignored


def test_the_page_buttons_start_a_play_at_frame_t_when_none_is_going(user):
    imagined, truth, strip, table, text = page_play.play_move(5, user)
    assert "**Playing from frame 5**" in text and list(table["action"]) == ["move right"]
    assert imagined["value"].shape == truth["value"].shape == (448, 448, 3)
    page_play.play_stay(9, user)  # continues: frame t only matters for a new play
    assert list(user.controller.current_play().actions) == [1, 0] and user.controller.current_play().frame_index == 5
    page_sessions.load_session("alternate", user)  # a session loaded again: the next press starts afresh
    assert "Cannot play: no play has begun" in _message(page_play.play, "1", user)
    assert "**Playing from frame 7**" in page_play.play_typed(7, "11", user)[4]


# -----------------------------------------------------------------------------
# compare


def test_a_model_compared_with_itself_gives_identical_columns(trained):
    trained.save_named("same")
    s = trained.session
    for names in (("same", "same"), (None, "same")):
        cmp = trained.compare(*names, s, batch_size=4)
        a, b = cmp.evaluations
        for column in ("frame_index", "action", "mse", "copy_mse", "dot_error"):
            np.testing.assert_array_equal(getattr(a, column), getattr(b, column), err_msg=column)
        assert len(cmp.top) == 0 and not cmp.disagreement.any()
    assert cmp.names == (THIS_TAB, "same")


def test_comparison_columns_are_each_models_evaluation_and_the_top_frames_differ_most(trained, tmp_path):
    other = RunController(checkpoint_path=trained.checkpoint_path.parent / "shared2.pth", config=TINY, device="cpu")
    other.load_session(trained.session)
    other.analysis_model()
    _jittered(other).save_named("other")  # an untrained model, jittered alike: it predicts otherwise
    s, calls = trained.session, []
    cmp = trained.compare("other", None, s, batch_size=4, progress=lambda done, total: calls.append((done, total)))
    for ev, wm in zip(cmp.evaluations, (other.world_model(), trained.world_model())):
        expected = wa.evaluate_session(wm, s, batch_size=4)
        np.testing.assert_array_equal(ev.mse, expected.mse)
        np.testing.assert_array_equal(ev.dot_error, expected.dot_error)
    assert calls == [(4, 12), (8, 12), (12, 12)]  # progress after every chunk
    assert 0 < len(cmp.top) <= 5 and np.all(np.diff(cmp.disagreement[cmp.top]) <= 0)
    assert cmp.disagreement[cmp.top[-1]] >= np.delete(cmp.disagreement, cmp.top).max()
    for i, index in enumerate(cmp.top):
        t = int(cmp.evaluations[0].frame_index[index])
        np.testing.assert_array_equal(cmp.top_actual[i], s.frame(t + 1))
        one = trained.world_model().predict_next_frame([s.frame(t - 1), {"action": s.action_after(t - 1)}, s.frame(t),
                                                        {"action": s.action_after(t)}])
        assert np.abs(cmp.top_predictions[1, i].astype(int) - one).max() <= 1  # batched rounding: a grey level


def test_compare_handler_shows_both_summaries_the_plot_and_the_disagreements(user):
    c = user.controller
    c.analysis_model()
    c.save_named("mine")
    text, plot, picture, top = page_play.compare_models(THIS_TAB, "mine", "always_move", user)
    n = 31 - 2
    assert f"both models predicted all {n} transitions" in text and "**A**: this tab's model" in text
    assert f"| all | {n} |" in text and "| after stay | 0 |" in text and f"| after move right | {n} |" in text
    rows = plot.dropna()
    assert (rows.groupby("series").size() == n).all() and set(rows["series"]) == {"model A", "model B"}
    assert picture["value"] is None and "predict every transition alike" in top


def test_bad_comparisons_are_refused_and_change_nothing(user):
    c = user.controller
    c.analysis_model()
    c.save_named("kept")
    folder = c.checkpoint_path.parent
    files = sorted(p.name for p in folder.iterdir())
    step = c.status().model_step
    cases = [(("nope", THIS_TAB, "alternate"), "no checkpoint named nope"),
             ((THIS_TAB, "../x", "alternate"), "Invalid checkpoint name '../x'"),
             ((THIS_TAB, "autoencoder", "alternate"), "it is the shared checkpoint"),
             ((None, THIS_TAB, "alternate"), "Model A must be a checkpoint name"),
             ((THIS_TAB, "", "alternate"), "Model B must be a checkpoint name"),
             ((THIS_TAB, "kept", "../x"), "Unknown session"),
             ((THIS_TAB, "kept", "nope"), "Unknown session")]
    for args, expected in cases:
        assert expected in _message(page_play.compare_models, *args, user), args
    assert sorted(p.name for p in folder.iterdir()) == files and c.status().model_step == step


def test_play_and_compare_validators_refuse_before_the_handler_runs(user):
    """Each refusal a person can make in section 7 is answered by the event's validator (so Gradio
    queues nothing and the play's pictures keep what they showed), under the box it came from."""
    n = user.controller.session.num_frames
    start = page_play.check_play_start(999, user)
    assert [v["is_valid"] for v in start] == [False, True]
    assert f"Frame index must be a whole number from 2 to {n - 1}" in start[0]["message"]
    assert "No play has begun" in page_play.check_play("1", user)[0]["message"]
    assert [v["is_valid"] for v in page_play.check_play_step(999, user)] == [False, True]  # no play: frame t is checked
    page_play.play_start(3, user)
    assert [v["is_valid"] for v in page_play.check_play("12", user)] == [False, True]
    assert [v["is_valid"] for v in page_play.check_play_step(999, user)] == [True, True]  # going: frame t is not used
    assert [v["is_valid"] for v in page_play.check_play_typed(999, "2", user)] == [True, False, True]
    assert [v["is_valid"] for v in page_play.check_play_typed(999, "1", user)] == [True, True, True]
    assert [v["is_valid"] for v in page_play.check_compare_models(None, THIS_TAB, "nope", user)] == [False, True, False, True]
    assert [v["is_valid"] for v in page_play.check_compare_models(THIS_TAB, THIS_TAB, "alternate", user)] == [True] * 4
