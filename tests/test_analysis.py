"""Questions to a world model (``world_model_analysis``, ``RunController``'s analysis methods):
counterfactual actions, open-loop rollouts, whole-session evaluation, single-canvas training.
Each is checked against the slow, obvious computation with the engine's own single-step calls."""

import copy

import numpy as np
import pytest
import torch

import world_model_analysis as wa
from frame_metrics import dot_centroid, dot_centroids, dot_error, dot_errors, frame_mse
from run_controller import RunBusyError, RunController
from models import build_canvas, build_prediction_canvases
from conftest import TINY, FakeSession


def _history(session, t, action):
    """The one-step prediction history for frame t under ``action``: [f(t-1), a(t-1), f(t), action]."""
    return [session.frame(t - 1), {"action": session.action_after(t - 1)}, session.frame(t), {"action": action}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 10 iterations on a 14-frame stay/move session, its prediction head
    jittered so that predictions differ per pixel (a fresh head predicts black everywhere)."""
    c = RunController(checkpoint_path=tmp_path_factory.mktemp("ckpt") / "autoencoder.pth", config=TINY, device="cpu")
    c.load_session(FakeSession(n=14))
    for _ in c.run(10):
        pass
    with torch.no_grad():
        head = c.world_model().model.mae.decoder_pred
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    return c


def _snapshot(wm):
    return (copy.deepcopy(wm.model.state_dict()), wm.step, wm.iteration, copy.deepcopy(wm.optimizer.state_dict()),
            wm.last_prediction.copy(), wm.last_prediction_canvas.copy(), list(wm.interleaved_history))


def _assert_unchanged(wm, before):
    state, step, iteration, opt, prediction, canvas, history = before
    for name, value in wm.model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    assert (wm.step, wm.iteration) == (step, iteration)
    assert wm.optimizer.state_dict()["state"].keys() == opt["state"].keys()
    np.testing.assert_array_equal(wm.last_prediction, prediction)
    np.testing.assert_array_equal(wm.last_prediction_canvas, canvas)
    assert len(wm.interleaved_history) == len(history)


def test_batched_prediction_canvases_equal_build_canvas():
    s = FakeSession(n=6)
    frames = np.stack([np.stack([s.frame(t - 1), s.frame(t)]) for t in (1, 2, 3)])  # (3, 2, H, W, 3)
    actions = np.array([[0, 1], [1, 0], [1, 1]])
    batch = build_prediction_canvases(frames, actions)
    for i in range(3):
        one = build_canvas([frames[i, 0], actions[i, 0], frames[i, 1], actions[i, 1]], TINY.frame_size, TINY.separator_width)
        np.testing.assert_array_equal(batch[i], one)


def test_vectorised_dot_metrics_equal_the_single_frame_ones():
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    frames[0, 10:13, 30:32] = 255  # split across the right edge ...
    frames[0, 10:13, 0:2] = 255  # ... and the left one: centre near x = 0 on the torus
    frames[1, 5:8, 5:8] = 200
    frames[3, 20:23, 14:17] = 255  # frames[2] has no dot
    centres = dot_centroids(frames)
    assert np.isnan(centres[2]).all()
    assert min(centres[0, 0], 32 - centres[0, 0]) < 0.6 and centres[0, 1] == pytest.approx(11.0)
    for i in (0, 1, 3):
        assert tuple(centres[i]) == pytest.approx(dot_centroid(frames[i]))
    errors = dot_errors(frames[[0, 2, 1]], frames[[1, 1, 2]])  # dot vs dot, none predicted, none actual
    assert errors[0] == pytest.approx(dot_error(frames[0], frames[1])) and errors[1] == np.inf and np.isnan(errors[2])
    assert dot_error(frames[1], frames[2]) is None and dot_error(frames[2], frames[1]) == np.inf


def test_counterfactual_pictures_equal_predict_next_frame_under_each_action(trained):
    wm, s = trained.world_model(), trained.session
    before = _snapshot(wm)
    cf = trained.counterfactual(5)
    _assert_unchanged(wm, before)
    assert cf.actions == (0, 1) and cf.recorded_action == s.action_after(5)
    np.testing.assert_array_equal(cf.actual, s.frame(6))
    for i, action in enumerate(cf.actions):
        expected = wm.predict_next_frame(_history(s, 5, action))
        np.testing.assert_array_equal(cf.predictions[i], expected)
        assert cf.mse[i] == pytest.approx(frame_mse(expected, s.frame(6)), rel=1e-6)
    assert not np.array_equal(cf.predictions[0], cf.predictions[1])  # the action steers the picture


def test_rollout_of_one_step_is_the_one_step_prediction_and_longer_ones_feed_back(trained):
    wm, s = trained.world_model(), trained.session
    before = _snapshot(wm)
    one = trained.rollout(4, 1)
    three = trained.rollout(4, 3)
    _assert_unchanged(wm, before)
    np.testing.assert_array_equal(one.predicted[0], wm.predict_next_frame(_history(s, 4, s.action_after(4))))
    p1 = three.predicted[0]
    p2 = wm.predict_next_frame([s.frame(4), {"action": s.action_after(4)}, p1, {"action": s.action_after(5)}])
    p3 = wm.predict_next_frame([p1, {"action": s.action_after(5)}, p2, {"action": s.action_after(6)}])
    np.testing.assert_array_equal(three.predicted[1], p2)
    np.testing.assert_array_equal(three.predicted[2], p3)
    np.testing.assert_array_equal(three.actual, np.stack([s.frame(5), s.frame(6), s.frame(7)]))
    assert list(three.actions) == [s.action_after(i) for i in (4, 5, 6)]
    assert three.copy_mse == pytest.approx([frame_mse(s.frame(4), s.frame(i)) for i in (5, 6, 7)])
    assert three.mse == pytest.approx([frame_mse(p, s.frame(i)) for p, i in zip((p1, p2, p3), (5, 6, 7))], rel=1e-6)


def test_evaluation_equals_a_slow_loop_over_transitions(trained):
    wm, s = trained.world_model(), trained.session
    before = _snapshot(wm)
    ev = trained.evaluate(s)
    _assert_unchanged(wm, before)
    n = len(s.observations)
    assert list(ev.frame_index) == list(range(1, n - 1)) and (ev.model_step, ev.model_iteration) == (wm.step, wm.iteration)
    slow = []
    for t in range(1, n - 1):
        predicted, actual = wm.predict_next_frame(_history(s, t, s.action_after(t))), s.frame(t + 1)
        slow.append((s.action_after(t), frame_mse(predicted, actual), frame_mse(s.frame(t), actual),
                     dot_error(predicted, actual)))
    # batched matrix products round differently from single ones: a pixel may differ by one grey level
    assert list(ev.action) == [r[0] for r in slow]
    np.testing.assert_allclose(ev.mse, [r[1] for r in slow], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ev.copy_mse, [r[2] for r in slow], rtol=1e-6)
    np.testing.assert_allclose(ev.dot_error, [np.nan if r[3] is None else r[3] for r in slow], rtol=1e-5)
    for action in (None, 0, 1):
        rows = [r for r in slow if action is None or r[0] == action]
        summary = ev.summary(action)
        assert summary["n"] == len(rows)
        assert summary["prediction_mse"] == pytest.approx(np.mean([r[1] for r in rows]), rel=1e-5)
        assert summary["copy_mse"] == pytest.approx(np.mean([r[2] for r in rows]))


def test_evaluation_summary_counts_dots_found_within_3px():
    ev = wa.Evaluation("hand", np.arange(5), np.array([0, 1, 1, 0, 1]), np.full(5, 0.2), np.full(5, 0.4),
                       np.array([1.0, 2.5, np.inf, np.nan, 7.0]), 3, 4, 0.0)
    overall, moves = ev.summary(), ev.summary(1)
    assert overall["mse_ratio"] == pytest.approx(0.5)
    assert overall["dot_present"] == pytest.approx(3 / 4) and overall["within_3px"] == pytest.approx(2 / 4)
    assert overall["median_dot_error_px"] == pytest.approx((2.5 + 7.0) / 2)
    assert moves["n"] == 3 and moves["within_3px"] == pytest.approx(1 / 3) and moves["median_dot_error_px"] == 7.0
    assert ev.summary(2) == {"n": 0}


def test_analysis_refuses_frames_without_a_history_or_a_next_frame(trained):
    n = len(trained.session.observations)
    with pytest.raises(ValueError, match=rf"Frame index must be a whole number from 1 to {n - 2}"):
        trained.counterfactual(0)
    with pytest.raises(ValueError, match=rf"from 1 to {n - 2} \(got {n - 1}\)\."):
        trained.rollout(n - 1, 1)
    with pytest.raises(ValueError, match=r"Steps k \(frame 10 \+ k must exist\) must be a whole number from 1 to 3"):
        trained.rollout(10, 4)
    with pytest.raises(ValueError, match="from 2 to"):
        trained.train_single_canvas(1, 5)
    with pytest.raises(ValueError, match="has 2 frames"):
        wa.evaluate_session(trained.world_model(), FakeSession(n=2))


def test_analysis_needs_a_session_and_builds_no_model_without_one(tmp_path):
    c = RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu")
    with pytest.raises(ValueError, match="no session is loaded"):
        c.counterfactual(1)
    assert not c.has_model


def test_single_canvas_training_fits_that_canvas_and_is_a_run(tmp_path):
    c = RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu")
    c.load_session(FakeSession(n=14))
    for _ in c.run(4):
        pass
    c.set_start_frame(9)  # the user moved the slider: single-canvas training must keep it
    history, step = list(c.history), c.world_model().step
    steps = [m for m in c.train_single_canvas(6, 100) if m is not None]
    assert [m["step"] for m in steps] == list(range(step + 1, step + 101))
    assert steps[-1]["mse"] < 0.5 * steps[0]["mse"]  # it fits the one canvas
    assert all(m["grad_norm"] > 0 and m["lr"] > 0 for m in steps)
    canvas = wa.training_canvas(c.session, 6, TINY)
    np.testing.assert_array_equal(c.training_views()["original"], canvas)  # the views show that canvas
    assert c.history == history and c.start_frame == 9  # loop history and slider untouched
    assert c.saved.ok and c.saved.step == step + 100  # finished like a run: saved
    assert c.status().state == "done"


def test_single_canvas_training_waits_for_a_run_and_honours_stop(tmp_path):
    c = RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu", run_lock_wait_s=0.1)
    c.load_session(FakeSession(n=8))
    run = c.run(3)
    next(run)  # the run holds its lock
    with pytest.raises(RunBusyError):
        next(c.train_single_canvas(3, 5))
    list(run)
    training = c.train_single_canvas(3, 50)
    next(training), next(training)
    c.stop_event.set()
    assert len([m for m in training]) <= 1 and c.status().state == "stopped"


def test_training_replays_other_canvases_unless_told_not_to(trained):
    wm = trained.world_model()
    canvas = wa.training_canvas(trained.session, 5, TINY)
    assert len(wm._training_batch(canvas)) == 1 + TINY.replay_batch_size
    assert len(wm._training_batch(canvas, replay=False)) == 1


def test_grad_norm_is_reported_with_and_without_clipping(tmp_path):
    import dataclasses

    for clip in (1.0, 0.0):
        c = RunController(checkpoint_path=tmp_path / f"c{clip}.pth", config=dataclasses.replace(TINY, grad_clip=clip), device="cpu")
        c.load_session(FakeSession(n=6))
        metrics = [m for m in c.run(4) if m is not None]
        assert metrics[0]["grad_norm"] is None  # no training before the third frame
        assert all(m["grad_norm"] > 0 for m in metrics[2:])


def test_prediction_canvas_view_and_attention_prediction_show_the_predicted_slot(trained):
    wm = trained.world_model()
    views = trained.prediction_views()
    x0 = 2 * (TINY.frame_size[1] + TINY.separator_width)
    np.testing.assert_array_equal(views["canvas"][:, x0:], views["predicted"])
    np.testing.assert_array_equal(views["canvas"][:, :x0], wm.last_prediction_canvas[:, :x0])
    capture = wm.capture_decoder_attention()
    # the capture pass uses the unfused attention path (to read the weights): a grey level of rounding
    difference = np.abs(capture.prediction.astype(int) - wm.predict_canvas(capture.canvas)[:, x0:])
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
