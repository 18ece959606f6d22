"""Tests of the toroidal dot environment and the action selectors."""

import math

import numpy as np
import pytest

from toroidal_action_selectors import (
    PATTERNS,
    SEQUENCE_ALTERNATE,
    SEQUENCE_DOUBLE_MOVE,
    create_constant_action_selector,
    create_random_action_selector,
    create_sequence_action_selector,
    make_selector,
)
from toroidal_dot_robot import ToroidalDotRobot, action_dict, parse_action

SPACE = [{"action": 0}, {"action": 1}]


def test_same_seed_gives_same_start_and_frames():
    a, b = ToroidalDotRobot(seed=7), ToroidalDotRobot(seed=7)
    assert a.get_position() == b.get_position()
    for action in [1, 0, 1, 1]:
        a.execute_action({"action": action})
        b.execute_action({"action": action})
        assert np.array_equal(a.get_observation(), b.get_observation())


def test_different_seeds_give_different_starts():
    starts = {ToroidalDotRobot(seed=s).get_position() for s in range(5)}
    assert len(starts) == 5  # five seeds, five start positions


def test_frame_is_black_with_a_white_dot():
    frame = ToroidalDotRobot(seed=0).get_observation()
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    assert set(np.unique(frame)) == {0, 255}
    assert np.array_equal(frame[..., 0], frame[..., 2])  # white, not coloured


def test_dot_pixel_count_is_about_pi_r_squared():
    frame = ToroidalDotRobot(seed=0, dot_radius=5).get_observation()
    count = int((frame[..., 0] == 255).sum())
    assert abs(count - math.pi * 25) / (math.pi * 25) < 0.1


def test_stay_keeps_the_frame():
    robot = ToroidalDotRobot(seed=3)
    before = robot.get_observation()
    robot.execute_action({"action": 0})
    assert np.array_equal(robot.get_observation(), before)


def test_move_shifts_right_by_27_pixels():
    robot = ToroidalDotRobot(seed=3)
    x, y = robot.get_position()
    before = robot.get_observation()
    robot.execute_action({"action": 1})
    assert robot.get_position() == ((x + 27) % 224, y)
    assert np.array_equal(robot.get_observation(), np.roll(before, 27, axis=1))


def test_move_wraps_past_the_right_edge():
    robot = ToroidalDotRobot(start=(220, 100))
    before = robot.get_observation()
    robot.execute_action(1)  # a bare int is accepted too
    assert robot.get_position() == (23, 100)
    assert np.array_equal(robot.get_observation(), np.roll(before, 27, axis=1))


def test_dot_near_a_corner_is_split_across_both_edges():
    frame = ToroidalDotRobot(start=(0, 0)).get_observation()[..., 0]
    assert frame[0, 0] == frame[0, 223] == frame[223, 0] == frame[223, 223] == 255
    assert (frame == 255).sum() == (ToroidalDotRobot(start=(100, 100)).get_observation()[..., 0] == 255).sum()


def test_get_observation_has_no_side_effect():
    robot = ToroidalDotRobot(seed=1)
    first = robot.get_observation()
    first[:] = 7  # mutating the returned array must not leak into the robot
    assert robot.get_position() == ToroidalDotRobot(seed=1).get_position()
    assert np.array_equal(robot.get_observation(), ToroidalDotRobot(seed=1).get_observation())


@pytest.mark.parametrize("bad", [2, -1, {"action": 5}, {"move": 1}, {"action": 1, "extra": 0}, "1", None, True,
                                 np.bool_(True), 1.0, {"action": 1.0}])
def test_bad_action_raises_naming_it(bad):
    robot = ToroidalDotRobot(seed=1)
    with pytest.raises(ValueError, match="Invalid action"):
        robot.execute_action(bad)
    assert robot.get_position() == ToroidalDotRobot(seed=1).get_position()


@pytest.mark.parametrize("action", [1, np.int64(1), {"action": 1}, {"action": np.int8(1)}])
def test_one_parser_reads_ints_and_action_dicts(action):
    assert parse_action(action) == 1 and type(parse_action(action)) is int
    assert action_dict(action) == {"action": 1}


def test_the_parser_checks_the_range_only_when_asked():
    assert parse_action({"action": 7}, valid=None) == 7
    with pytest.raises(ValueError, match="Invalid action '7': expected an integer"):
        parse_action("7", valid=None)
    with pytest.raises(ValueError, match=r"Invalid action 7: expected \{'action': 0\} \(stay\)"):
        parse_action(7)


@pytest.mark.parametrize("make", [lambda: create_sequence_action_selector([0, 2]),
                                  lambda: create_constant_action_selector({"move": 1})])
def test_selectors_refuse_a_bad_action_when_made(make):
    with pytest.raises(ValueError, match="Invalid action"):
        make()


def test_reset_returns_to_the_seeded_start():
    robot = ToroidalDotRobot(seed=4)
    start = robot.get_position()
    robot.execute_action(1)
    robot.reset()
    assert robot.get_position() == start


def test_action_space_and_params():
    robot = ToroidalDotRobot(seed=2)
    assert robot.action_space == SPACE
    params = robot.params()
    assert params["seed"] == 2 and params["dot_radius"] == 5 and params["move_pixels"] == 27
    assert (params["start_x"], params["start_y"]) == robot.get_position()


def test_sequence_selector_cycles():
    select = create_sequence_action_selector(SEQUENCE_DOUBLE_MOVE)
    assert [select(None, SPACE)["action"] for _ in range(7)] == [1, 1, 0, 1, 1, 0, 1]


def test_alternate_pattern_is_stay_then_move():
    select = make_selector("alternate")
    assert SEQUENCE_ALTERNATE == [0, 1]
    assert [select(None, SPACE) for _ in range(4)] == [{"action": 0}, {"action": 1}] * 2


def test_constant_selector_returns_copies():
    select = create_constant_action_selector({"action": 1})
    first = select(None, SPACE)
    first["action"] = 0
    assert select(None, SPACE) == {"action": 1}


def test_random_selector_is_seeded_and_uses_the_action_space():
    a, b = create_random_action_selector(5), create_random_action_selector(5)
    picks = [a(None, SPACE) for _ in range(50)]
    assert picks == [b(None, SPACE) for _ in range(50)]
    assert {p["action"] for p in picks} == {0, 1}


def test_make_selector_knows_every_pattern_and_refuses_others():
    assert set(PATTERNS) == {"always_move", "always_stay", "alternate", "double_move", "triple_move"}
    for name in [*PATTERNS, "random"]:
        assert make_selector(name, seed=0)(None, SPACE) in SPACE
    with pytest.raises(ValueError, match="Unknown pattern"):
        make_selector("zigzag")
