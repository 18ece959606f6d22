"""The CUDA path: graphs, bf16 autocast, no host sync inside a step, flat GPU memory.

Skipped on a machine without CUDA (CI has none); ``benchmarks/gpu_check.sh`` runs them on a GPU.
"""

import dataclasses

import numpy as np
import pytest
import torch

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from config import AutoencoderConcatPredictorWorldModelConfig
from models import build_canvas
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BASE = AutoencoderConcatPredictorWorldModelConfig()


def _world_model(**overrides) -> AutoencoderConcatPredictorWorldModel:
    cfg = dataclasses.replace(BASE, **overrides)
    return AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=42), make_selector("alternate"), device="cuda", config=cfg)


def _losses(metrics):
    return np.array([m["training_loss"] for m in metrics if m["training_loss"] is not None])


def test_graphed_fp32_loop_equals_the_eager_fp32_loop():
    """Replaying recorded steps and predictions must give the eager numbers (the graph reads fresh
    inputs, rate and loss weight every step)."""
    eager = _world_model(cuda_precision="fp32", cuda_graphs=False).run(30)
    wm = _world_model(cuda_precision="fp32", cuda_graphs=True)
    graphed = wm.run(30)
    assert wm.graph_status() == {"train": "graph", "predict": "graph"}
    # the GPU's attention backward sums with atomics: runs differ in the last bits, and that grows over steps
    np.testing.assert_allclose(_losses(graphed), _losses(eager), rtol=1e-3, atol=1e-6)
    errors = lambda ms: np.array([m["prediction_error"] for m in ms if m["prediction_error"] is not None])  # noqa: E731
    np.testing.assert_allclose(errors(graphed), errors(eager), rtol=5e-3, atol=1e-6)


def test_graphs_keep_their_index_tensors_when_the_cache_is_cleared():
    """Analyses with many batch sizes clear the index cache; the recorded graphs must keep reading
    the tensors they were recorded with (freed memory could be reused by anything)."""
    wm = _world_model(cuda_precision="fp32")
    wm.run(10)
    recorded = {id(t) for entry in wm.model.mae.cached_index_sets() for t in entry}
    canvases = np.zeros((20, 224, 688, 3), np.uint8)
    for b in range(1, 20):  # 19 batch sizes: more than the cache holds
        wm.predict_slots(canvases[:b], batch_size=b)
    assert not recorded <= {id(t) for entry in wm.model.mae.cached_index_sets() for t in entry}  # the cache was cleared
    kept = {id(t) for entry in wm.graph_kept("train") for t in entry}
    assert recorded <= kept
    torch.cuda.empty_cache()
    assert np.isfinite(_losses(wm.run(10))).all()


def test_bf16_autocast_stays_within_tolerance_of_fp32():
    """bf16 matrix products over fp32 master weights: the losses of 60 iterations within 5% of fp32's."""
    fp32 = _losses(_world_model(cuda_precision="fp32").run(60))
    bf16_model = _world_model(cuda_precision="bf16")
    bf16 = _losses(bf16_model.run(60))
    assert all(p.dtype == torch.float32 for p in bf16_model.model.parameters())  # master weights stay fp32
    np.testing.assert_allclose(bf16, fp32, rtol=5e-2)


def test_a_training_step_never_waits_for_the_device():
    wm = _world_model()
    wm.run(10)  # warm-up: graphs recorded, index tensors uploaded
    frames = [wm.robot.get_observation() for _ in range(3)]
    canvas = build_canvas([frames[0], 1, frames[1], 1, frames[2]])
    torch.cuda.set_sync_debug_mode("error")
    try:
        wm.train_autoencoder(canvas, deferred=True)  # raises on any synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(wm.read_training_step()["loss"])


def test_gpu_memory_is_flat_over_a_long_run():
    wm = _world_model()
    wm.run(50)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    wm.run(500)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 1 * 2**20


def test_loading_a_checkpoint_records_the_graphs_again(tmp_path):
    wm = _world_model()
    wm.run(12)
    path = wm.save_checkpoint(tmp_path / "a.pth")
    wm.load_checkpoint(path)
    assert wm.graph_status() == {}  # the old graphs pointed at the replaced optimizer state
    metrics = wm.run(12)
    assert np.isfinite(_losses(metrics)).all() and wm.graph_status()["train"] == "graph"
    cpu = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=42), make_selector("alternate"), device="cpu")
    cpu.load_checkpoint(path)  # a checkpoint saved by the graphed CUDA model loads on a CPU
    assert all(not torch.is_tensor(g["lr"]) and not g.get("capturable") for g in cpu.optimizer.param_groups)
    assert np.isfinite(_losses(cpu.run(4))).all()
