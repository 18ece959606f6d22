"""Learning regression: the real model, default settings, learns where the dot goes.

A fixed-seed version of ``benchmarks/bench_learning.py`` (always_move on the live robot): a fresh
model at the spec's sizes runs the default loop (one optimizer step per iteration) and must put
the predicted dot within 3 px of the true one on a fair share of the last predictions.

Thresholds come from measurements on the 2-core CPU machine, with margin. With these defaults
(single-thread runs, always_move, live): seed 1234 had 34% and 36% within 3 px (median 5.5 and
3.9 px) in the windows of 50 iterations ending at 450 and 500; seed 7 had 32% and 38%; without
the action look-up head, seed 1234 had 34% and 60%. The old half-patch correspondence offsets
reached 26-30% with a median of 7.5-8.5 px; no correspondence init never drew a dot. The CPU
thread count changes the float reduction order and with it the exact trajectory, hence the margin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from config import AutoencoderConcatPredictorWorldModelConfig
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot

ITERATIONS = 500  # ~2 min at ~0.2 s per iteration on 2 free cores
WINDOW = 100  # the predictions judged


@pytest.mark.slow
def test_real_model_learns_where_the_dot_goes():
    # one thread: the measured trajectory. With 2 threads the same run diverged and failed
    # (2% within 3 px, median 86 px): learning at these settings is still fragile
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_learning()
    finally:
        torch.set_num_threads(threads)


def _check_learning():
    robot = ToroidalDotRobot(seed=1234)
    wm = AutoencoderConcatPredictorWorldModel(
        robot, make_selector("always_move"), device="cpu", config=AutoencoderConcatPredictorWorldModelConfig()
    )
    metrics = wm.run(ITERATIONS)
    last = [m for m in metrics[-WINDOW:] if m["dot_error"] is not None]
    assert len(last) == WINDOW
    errors = np.array([m["dot_error"] for m in last])
    within_3px = float(np.mean(errors <= 3.0))
    median = float(np.median(errors))
    dot_present = float(np.mean(np.isfinite(errors)))
    summary = f"within 3 px {within_3px:.2f}, median {median:.1f} px, dot present {dot_present:.2f}"
    assert dot_present >= 0.9, summary  # a dot is drawn, not a black frame
    assert median <= 8.0, summary  # it lands near the right place
    assert within_3px >= 0.2, summary  # and often within 3 px
