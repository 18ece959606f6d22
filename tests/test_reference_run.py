"""Speed work must not change behaviour: a fixed-seed fp32 run reproduces stored losses.

The reference numbers were produced by this code on the 2-core CPU machine (1 and 2 threads gave
identical values to 7 digits). An optimisation that changes the maths (another kernel, another
precision, a different order of operations that matters) moves them beyond the tolerance. Both
decoders are pinned (the default cross decoder and the MAE self-attention decoder), each with the
default recipe and with the recipe before it, whose numbers were stored before the default changed.
"""

import dataclasses

import numpy as np
import pytest
import torch

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from config import AutoencoderConcatPredictorWorldModelConfig
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot

# ToroidalDotRobot(seed=42), alternate, 10 iterations (8 training steps), batch of 4 with torus-rolled
# replays, with each decoder: (training losses, prediction errors). The default recipe (torus position
# code, dot weight 2) and the one before it (canvas code, dot weight 5: its checkpoints still load)
CANVAS_WEIGHT_5 = {"decoder_position": "canvas", "foreground_weight": 5.0}
RECIPES = {
    "cross_self": {},
    "self": {"decoder_mode": "self"},
    "canvas_weight_5_cross_self": CANVAS_WEIGHT_5,
    "canvas_weight_5_self": CANVAS_WEIGHT_5 | {"decoder_mode": "self"},
}
REFERENCE = {
    "cross_self": (
        [0.0032234, 0.0032196, 0.0032166, 0.0032131, 0.0032204, 0.0032201, 0.0032256, 0.0032188],
        [0.0016143, 0.0016143, 0.0016125, 0.001616, 0.0016265, 0.0016325, 0.0016344, 0.0016282],
    ),
    "self": (
        [0.0032234, 0.0032198, 0.0032165, 0.0032135, 0.0032189, 0.0032191, 0.0032244, 0.0032171],
        [0.0016143, 0.0016143, 0.0016147, 0.0016161, 0.0016228, 0.0016283, 0.0016357, 0.0016292],
    ),
    "canvas_weight_5_cross_self": (
        [0.0080198, 0.0080093, 0.0079957, 0.0079714, 0.0079672, 0.0079595, 0.0079761, 0.0079744],
        [0.0016143, 0.0016143, 0.0016152, 0.001617, 0.0016395, 0.0016711, 0.0017118, 0.0017458],
    ),
    "canvas_weight_5_self": (
        [0.0080198, 0.0080091, 0.0079937, 0.0079705, 0.0079615, 0.007962, 0.0079789, 0.0079774],
        [0.0016143, 0.0016143, 0.001616, 0.0016172, 0.001643, 0.0016774, 0.0017221, 0.0017453],
    ),
}


def test_the_default_decoder_is_the_pinned_cross_decoder():
    assert AutoencoderConcatPredictorWorldModelConfig().decoder_mode == "cross_self"


@pytest.mark.parametrize("recipe", sorted(REFERENCE))
def test_fixed_seed_fp32_run_matches_the_stored_reference(recipe):
    cfg = dataclasses.replace(AutoencoderConcatPredictorWorldModelConfig(), **RECIPES[recipe])
    wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=42), make_selector("alternate"), device="cpu",
                                              config=cfg)
    assert next(wm.model.parameters()).dtype == torch.float32
    metrics = wm.run(10)
    losses = [m["training_loss"] for m in metrics if m["training_loss"] is not None]
    errors = [m["prediction_error"] for m in metrics if m["prediction_error"] is not None]
    reference_losses, reference_errors = REFERENCE[recipe]
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(errors, reference_errors, rtol=2e-4, atol=1e-6)
