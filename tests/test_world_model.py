"""The world model's loop, views, replay and checkpoints, through its public methods."""

import dataclasses
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel, ReplayRobot, get_lr
from checkpoints import CheckpointError
from frame_metrics import dot_centroid, dot_error
from config import AutoencoderConcatPredictorWorldModelConfig
from conftest import TINY, FakeSession
from models import canvas_to_tensor, tensor_to_uint8
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot

ROOT = Path(__file__).resolve().parents[1]
def _tiny_world_model(pattern="alternate", seed=3, config=TINY):
    robot = ToroidalDotRobot(seed=seed)
    return AutoencoderConcatPredictorWorldModel(robot, make_selector(pattern), device="cpu", config=config)


def test_loop_trains_from_the_third_frame_and_predicts_from_the_second():
    wm = _tiny_world_model()
    m1, m2, m3 = wm.run(3)
    assert m1["training_loss"] is None and m1["prediction_error"] is None
    assert m2["training_loss"] is None and m2["prediction_error"] is None  # first prediction made here
    assert m3["training_loss"] is not None and m3["prediction_error"] is not None and wm.step == 1
    assert wm.last_training_canvas.shape == (224, 688, 3)
    assert wm.last_prediction.shape == (224, 224, 3) and wm.last_prediction.dtype == np.uint8
    assert len(wm.interleaved_history) == 4  # [f(t-1), a(t-1), f(t), a(t)]


def test_each_step_trains_on_the_current_canvas_plus_rolled_replays():
    wm = _tiny_world_model(pattern="double_move")
    seen = []
    forward = wm.model.forward_patches
    wm.model.forward_patches = lambda patches, *a, **k: (seen.append(patches.detach().clone()), forward(patches, *a, **k))[1]
    wm.run(6)
    batches = [x for x in seen if x.shape[0] > 1]  # training passes; predictions are single canvases
    assert len(batches) == 4 and all(x.shape[0] == 1 + TINY.replay_batch_size for x in batches)
    last = wm.model.reconstruct(batches[-1])  # (B, 3, H, W) the canvases the model saw
    assert torch.equal(last[0], canvas_to_tensor(wm.last_training_canvas)[0])  # the current canvas comes first, as it is
    dots = [tuple(np.argwhere(x[0, :, 464:].numpy() > 0.5).mean(0).round()) for x in last]  # dot centre in the target slot
    assert len(set(dots)) > 1  # the replayed copies are rolled elsewhere on the torus
    assert len(wm.replay_buffer) == 4  # every training canvas goes to the buffer


def test_views_have_the_spec_shapes():
    wm = _tiny_world_model()
    wm.run(4)
    views = wm.get_training_views()
    assert set(views) == {"original", "masked", "inpainting", "composite"}
    assert all(v.shape == (224, 688, 3) and v.dtype == np.uint8 for v in views.values())
    assert np.array_equal(views["composite"][:, :464], views["original"][:, :464])  # visible part kept
    assert np.array_equal(views["inpainting"][:, 464:], views["composite"][:, 464:])  # the step's own prediction
    products = wm._train_products
    with torch.no_grad():  # the visible patches: the last block and pixel head on the input the step kept
        expected = wm.model.mae.finish_decoder(products.last_input)
    expected[:, products.mask] = products.pred[0]
    assert np.array_equal(views["inpainting"], tensor_to_uint8(wm.model.reconstruct(expected)[0]))
    assert products.full is not None and np.array_equal(wm.get_training_views()["inpainting"], views["inpainting"])
    pv = wm.get_prediction_views()
    assert pv["error"].shape == (224, 224, 3) and pv["error_mse"] == pytest.approx(
        float(np.mean((pv["checked"] / 255.0 - pv["current"] / 255.0) ** 2)), rel=1e-5)


def test_stop_event_ends_the_run_between_iterations():
    import threading

    wm = _tiny_world_model()
    stop = threading.Event()
    seen = []
    for metrics in wm.run_iter(50, stop):
        seen.append(metrics)
        if len(seen) == 3:
            stop.set()
    assert len(seen) == 3 and wm.iteration == 3


def test_replay_robot_plays_recorded_frames_and_actions_and_loops():
    session = FakeSession(4)
    robot = ReplayRobot(session)
    wm = AutoencoderConcatPredictorWorldModel(robot, device="cpu", config=TINY)
    wm.run(4)
    assert robot.index == 0  # looped after the 4th frame
    assert wm.interleaved_history == []  # no canvas may span the seam
    wm.run(1)
    assert np.array_equal(wm.last_observation, session.frames[0])


def test_lr_schedule_warms_up_then_decays():
    cfg = AutoencoderConcatPredictorWorldModelConfig()
    assert get_lr(0, cfg) < get_lr(cfg.warmup_steps - 1, cfg) == pytest.approx(cfg.learning_rate)
    assert get_lr(cfg.lr_decay_steps, cfg) == cfg.min_lr
    assert get_lr(cfg.warmup_steps + 100, cfg) < cfg.learning_rate


def test_dot_metrics_handle_wrap_and_missing_dots():
    robot = ToroidalDotRobot(seed=0)
    frame = robot.get_observation()
    x, y = robot.get_position()
    cx, cy = dot_centroid(frame)
    assert abs(cx - x) < 0.5 and abs(cy - y) < 0.5
    assert dot_error(frame, frame) == pytest.approx(0.0, abs=1e-6)
    assert dot_error(np.zeros_like(frame), frame) == float("inf")
    edge = np.zeros((224, 224, 3), np.uint8)
    edge[100:103, :2] = 255
    edge[100:103, -2:] = 255  # a dot split across the left/right edge
    assert min(abs(dot_centroid(edge)[0] - 0), abs(dot_centroid(edge)[0] - 224)) < 1.0


def test_checkpoint_round_trip_restores_weights_optimizer_and_step(tmp_path):
    wm = _tiny_world_model()
    wm.run(5)
    path = wm.save_checkpoint(tmp_path / "ck.pth")
    other = _tiny_world_model(seed=9)
    info = other.load_checkpoint(path)
    assert info["step"] == wm.step == other.step
    for (k, a), (_, b) in zip(wm.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert other.optimizer.state_dict()["state"].keys() == wm.optimizer.state_dict()["state"].keys()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_saved_checkpoint_is_readable_by_its_owner_only(tmp_path):
    """The file holds the trained weights and the session's name: 0o600 whatever the umask, also
    when it replaces a file that others could read."""
    path = tmp_path / "ck.pth"
    path.write_bytes(b"an older file")
    path.chmod(0o644)
    wm = _tiny_world_model()
    wm.run(3)
    assert stat.S_IMODE(wm.save_checkpoint(path).stat().st_mode) == 0o600
    assert stat.S_IMODE(wm.save_checkpoint(tmp_path / "fresh.pth").stat().st_mode) == 0o600


def _assert_refused_and_untouched(wm, path, match):
    before = {k: v.clone() for k, v in wm.model.state_dict().items()}
    step = wm.step
    with pytest.raises(CheckpointError, match=match):
        wm.load_checkpoint(path)
    assert wm.step == step
    assert all(torch.equal(before[k], v) for k, v in wm.model.state_dict().items())


def _flip_inside_a_weight(checkpoint: bytes, weight: torch.Tensor) -> bytes:
    """Flip the lowest bit of a byte in the middle of ``weight``'s stored data (torch stores tensors uncompressed)."""
    raw = weight.detach().cpu().contiguous().numpy().tobytes()
    start = checkpoint.find(raw)
    assert start > 0 and checkpoint.find(raw, start + 1) < 0, "the weight's bytes are not stored once, verbatim"
    data = bytearray(checkpoint)
    data[start + len(raw) // 2] ^= 0x01  # a mantissa bit: still a finite number, so only the CRC can tell
    return bytes(data)


def test_corrupt_checkpoints_are_refused_with_the_model_untouched(tmp_path):
    wm = _tiny_world_model()
    wm.run(4)
    good = wm.save_checkpoint(tmp_path / "good.pth").read_bytes()
    largest = max(wm.model.state_dict().values(), key=lambda t: t.numel())
    cases = {
        "empty.pth": b"",
        "truncated.pth": good[: len(good) // 2],
        "random.pth": np.random.default_rng(0).bytes(4096),
        "flipped.pth": _flip_inside_a_weight(good, largest),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        _assert_refused_and_untouched(wm, tmp_path / name, f"{name} is not a readable checkpoint")
    _assert_refused_and_untouched(wm, tmp_path / "missing.pth", "no checkpoint file")
    (tmp_path / "dir.pth").mkdir()
    _assert_refused_and_untouched(wm, tmp_path / "dir.pth", "no checkpoint file")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    wm = _tiny_world_model()
    wm.run(3)
    path = wm.save_checkpoint(tmp_path / "tiny.pth")
    wider = _tiny_world_model(config=dataclasses.replace(TINY, decoder_embed_dim=64))
    _assert_refused_and_untouched(wider, path, "another architecture")


def test_checkpoint_without_weights_is_refused(tmp_path):
    wm = _tiny_world_model()
    payload = wm._checkpoint_payload()
    del payload["model"]
    torch.save(payload, tmp_path / "noweights.pth")
    _assert_refused_and_untouched(wm, tmp_path / "noweights.pth", "no complete set of model weights")


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/cwm_pickle_ran"),))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = Path("/tmp/cwm_pickle_ran")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    torch.save({"format": "x", "payload": _Boom()}, path)
    wm = _tiny_world_model()
    _assert_refused_and_untouched(wm, path, "not a readable checkpoint")
    with open(tmp_path / "evil2.pth", "wb") as f:
        pickle.dump(_Boom(), f)
    _assert_refused_and_untouched(wm, tmp_path / "evil2.pth", "not a readable checkpoint")
    assert not marker.exists()


def test_a_new_process_loads_the_checkpoint_and_predicts_the_same_frame(tmp_path):
    """The whole round trip: run on a recorded session, save, reload elsewhere, same prediction."""
    from record_session import record_session
    from session_explorer_lib import load_session

    session_dir = record_session("alternate", 50, 1, root=tmp_path)
    session = load_session(session_dir.name, root=tmp_path)
    wm = AutoencoderConcatPredictorWorldModel(ReplayRobot(session), device="cpu")
    wm.run(20)
    ck = wm.save_checkpoint(tmp_path / "autoencoder.pth")
    history = wm.interleaved_history
    np.save(tmp_path / "history.npy", np.stack([history[0], history[2]]))
    expected = wm.predict_next_frame(history)
    script = f"""
import sys, numpy as np, torch
sys.path.insert(0, {str(ROOT)!r})
torch.set_num_threads(1)
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from toroidal_dot_robot import ToroidalDotRobot
wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=5), device="cpu")
wm.load_checkpoint({str(ck)!r})
f = np.load({str(tmp_path / 'history.npy')!r})
np.save({str(tmp_path / 'pred.npy')!r}, wm.predict_next_frame([f[0], {history[1]!r}, f[1], {history[3]!r}]))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got = np.load(tmp_path / "pred.npy")
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # same frame up to float rounding


def _plain(value) -> bool:
    """Tensors and plain Python data only (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))


def test_training_state_is_plain_data_and_restores_the_run_exactly():
    parked, straight = _tiny_world_model(), _tiny_world_model()
    parked.run(5)
    straight.run(5)
    state = parked.training_state()
    assert _plain(state) and state["step"] == 3 and state["iteration"] == 5
    robot, selector = parked.robot, parked.action_selector
    reloaded = AutoencoderConcatPredictorWorldModel(robot, selector, device="cpu", config=TINY)
    reloaded.load_training_state(state)
    np.testing.assert_array_equal(reloaded.last_prediction, straight.last_prediction)
    assert reloaded.get_training_views().keys() == straight.get_training_views().keys()
    after, expected = reloaded.run(3), straight.run(3)
    for key in ("prediction_error", "training_loss", "grad_norm", "step", "iteration"):
        assert [m[key] for m in after] == [m[key] for m in expected], key


def test_a_robot_is_detached_and_attached_with_a_fresh_history():
    wm = _tiny_world_model()
    wm.run(3)
    robot = wm.detach_robot()
    assert wm.robot is None and wm.interleaved_history == [] and wm.last_prediction is None
    wm.attach_robot(robot)
    m = wm.run(1)[0]
    assert m["prediction_error"] is None and m["iteration"] == 4 and len(wm.interleaved_history) == 2


def test_cpu_precision_comes_from_the_environment_and_a_bad_value_is_named():
    assert AutoencoderConcatPredictorWorldModelConfig.from_env({}).cpu_precision == "fp32"
    assert AutoencoderConcatPredictorWorldModelConfig.from_env({"CWM_CPU_PRECISION": "auto"}).cpu_precision == "auto"
    with pytest.raises(ValueError, match="cpu_precision must be 'auto', 'bf16' or 'fp32', got 'fp16'"):
        _tiny_world_model(config=dataclasses.replace(TINY, cpu_precision="fp16"))


@pytest.mark.parametrize("has_amx", [False, True])
def test_auto_cpu_precision_is_bf16_exactly_where_the_cpu_has_amx(monkeypatch, has_amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx)
    wm = _tiny_world_model(config=dataclasses.replace(TINY, cpu_precision="auto"))
    assert wm.autocast_dtype == (torch.bfloat16 if has_amx else None)
    assert _tiny_world_model(config=dataclasses.replace(TINY, cpu_precision="fp32")).autocast_dtype is None


def test_a_bf16_model_on_the_cpu_keeps_fp32_weights_and_its_checkpoint_loads_in_fp32(tmp_path):
    wm = _tiny_world_model(config=dataclasses.replace(TINY, cpu_precision="bf16"))
    metrics = wm.run(6)
    assert wm.autocast_dtype == torch.bfloat16 and wm.step == 4
    assert all(np.isfinite(m["training_loss"]) for m in metrics[2:])
    assert all(p.dtype == torch.float32 for p in wm.model.parameters())  # master weights, AdamW state in fp32
    assert wm.last_prediction.dtype == np.uint8 and wm.last_prediction.shape == (224, 224, 3)
    path = tmp_path / "bf16.pth"
    wm.save_checkpoint(path)
    fp32 = _tiny_world_model(config=TINY)
    fp32.load_checkpoint(path)
    for a, b in zip(wm.model.parameters(), fp32.model.parameters()):
        assert torch.equal(a, b)
