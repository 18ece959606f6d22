"""A checkpoint saved with another decoder position code (or decoder mode) than the model is set to
loads: the model takes the file's code on, predicts exactly as the model that saved it, and saves
it again; a file that differs in anything else is still refused with the model untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from checkpoints import CheckpointError, read_checkpoint, write_checkpoint
from conftest import TINY
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot

# TINY with the narrowest decoder the torus code allows (64 wide, heads 16 wide; TINY's is 32)
SMALL = dataclasses.replace(TINY, decoder_embed_dim=64)
CANVAS = dataclasses.replace(SMALL, decoder_position="canvas")
TORUS = dataclasses.replace(SMALL, decoder_position="torus")


def _jitter(wm: AutoencoderConcatPredictorWorldModel, seed: int = 0) -> AutoencoderConcatPredictorWorldModel:
    """Every weight nudged by seeded noise: predictions differ per pixel and depend on the position code
    (a fresh pixel head is zero, so every model would predict the same black frame)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wm.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return wm


def _trained(cfg, seed: int = 0) -> AutoencoderConcatPredictorWorldModel:
    wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=seed), make_selector("alternate"), device="cpu",
                                              config=cfg)
    wm.run(4)
    return _jitter(wm, seed)


def _same_predictions(a: AutoencoderConcatPredictorWorldModel, b: AutoencoderConcatPredictorWorldModel,
                      canvas: np.ndarray) -> bool:
    """The same predicted slot and the same decoder attention (float32, every layer and head), bit for bit."""
    return (np.array_equal(a.predict_canvas(canvas), b.predict_canvas(canvas))
            and np.array_equal(a.capture_decoder_attention(canvas).weights, b.capture_decoder_attention(canvas).weights))


def _weights(wm) -> dict:
    return {k: v.clone() for k, v in wm.model.state_dict().items()}


# -----------------------------------------------------------------------------
# the engine


@pytest.mark.parametrize("saved_with, live", [
    (CANVAS, TORUS),
    (TORUS, CANVAS),
    (dataclasses.replace(CANVAS, decoder_mode="self"), CANVAS),  # the MAE decoder into a CrossMAE one
    (TORUS, dataclasses.replace(CANVAS, decoder_mode="self")),  # both codes at once
], ids=["canvas-into-torus", "torus-into-canvas", "self-into-cross", "torus-cross-into-canvas-self"])
def test_a_model_takes_on_the_decoder_code_of_the_file_and_predicts_as_the_saver(tmp_path, saved_with, live):
    saver = _trained(saved_with)
    path = saver.save_checkpoint(tmp_path / "saved.pth")
    live = dataclasses.replace(live, learning_rate=1e-3)  # a setting outside the architecture: the live one stays
    wm = AutoencoderConcatPredictorWorldModel(None, device="cpu", config=live)
    canvas = saver.last_prediction_canvas
    own_code = _same_predictions(wm, saver, canvas)
    rng = torch.get_rng_state()
    info = wm.load_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading leaves the seeded random streams alone
    assert (info["step"], info["iteration"]) == (saver.step, saver.iteration) == (wm.step, wm.iteration)
    assert wm.config == dataclasses.replace(live, decoder_position=saved_with.decoder_position,
                                            decoder_mode=saved_with.decoder_mode)
    assert _same_predictions(wm, saver, canvas)
    # the code matters: the same weights under the live model's own code predict otherwise
    kept = AutoencoderConcatPredictorWorldModel(None, device="cpu", config=live)
    kept.model.load_state_dict(saver.model.state_dict())
    assert not own_code and not _same_predictions(kept, saver, canvas)
    again = wm.save_checkpoint(tmp_path / "again.pth")  # a later save records the adopted code
    assert read_checkpoint(again)["architecture"] == saver.config.architecture()
    wm.attach_robot(ToroidalDotRobot(seed=5), make_selector("alternate"))
    assert wm.run(3)[-1]["training_loss"] is not None and wm.step == saver.step + 1  # it trains on from the file


def test_a_file_of_another_size_is_refused_as_before_and_the_model_is_untouched(tmp_path):
    path = _trained(dataclasses.replace(CANVAS, embed_dim=16)).save_checkpoint(tmp_path / "narrow.pth")
    wm = _trained(TORUS, seed=1)
    before, counters = _weights(wm), (wm.step, wm.iteration)
    with pytest.raises(CheckpointError) as refused:
        wm.load_checkpoint(path)
    diff = {"embed_dim": (32, 16), "decoder_position": ("torus", None)}
    assert str(refused.value) == f"narrow.pth was trained with another architecture (this model vs file: {diff})"
    assert wm.config == TORUS and (wm.step, wm.iteration) == counters
    assert all(torch.equal(before[k], v) for k, v in wm.model.state_dict().items())


def test_a_file_that_claims_a_decoder_code_no_model_has_is_refused_and_the_model_is_untouched(tmp_path):
    payload = read_checkpoint(_trained(CANVAS).save_checkpoint(tmp_path / "good.pth"))
    payload["architecture"]["decoder_position"] = "ring"
    path = write_checkpoint(tmp_path / "ring.pth", payload)
    wm = _trained(TORUS, seed=1)
    before = _weights(wm)
    with pytest.raises(CheckpointError, match="ring.pth records a decoder this model cannot be built with: "
                                              "decoder_position must be 'canvas' or 'torus', got 'ring'"):
        wm.load_checkpoint(path)
    assert wm.config == TORUS and all(torch.equal(before[k], v) for k, v in wm.model.state_dict().items())
