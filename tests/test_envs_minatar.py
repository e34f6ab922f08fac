"""Tests for wm_jax.envs.minatar: MinAtar's 10x10 channel observation drawn at 64x64, and
Breakout-MinAtar from pixels (offline, CPU, fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnax.environments.minatar import breakout

from wm_jax import envs
from wm_jax.envs.minatar import BREAKOUT_LEVELS, CELL, GRID, MARGIN, render_minatar

PADDLE, BALL, TRAIL, BRICK = BREAKOUT_LEVELS


def cell_pixels(frame: np.ndarray, row: int, col: int) -> np.ndarray:
    """The pixels of board cell (row, col): its lit 5x5 square."""
    top, left = MARGIN + row * CELL, MARGIN + col * CELL
    return frame[top : top + CELL - 1, left : left + CELL - 1]


def test_levels_are_distinct_grey_levels():
    assert len(set(BREAKOUT_LEVELS)) == 4 and all(0 < v <= 255 for v in BREAKOUT_LEVELS)
    assert BALL == max(BREAKOUT_LEVELS)  # the ball shows over anything


def test_every_cell_is_drawn_at_its_channel_level():
    obs = np.zeros((GRID, GRID, 4), np.float32)
    rng = np.random.default_rng(0)
    for channel in range(4):
        cells = rng.choice(GRID * GRID, 12, replace=False)
        obs[cells // GRID, cells % GRID, channel] = 1.0
    frame = np.asarray(render_minatar(obs))
    assert frame.shape == (64, 64) and frame.dtype == np.uint8
    expected = (obs * np.asarray(BREAKOUT_LEVELS)).max(axis=-1)
    for row in range(GRID):
        for col in range(GRID):
            assert (cell_pixels(frame, row, col) == round(expected[row, col])).all(), (row, col)
    # The margin and the 1 px seams between cells stay black.
    lit = np.zeros((64, 64), bool)
    for row in range(GRID):
        for col in range(GRID):
            lit[MARGIN + row * CELL : MARGIN + row * CELL + CELL - 1, MARGIN + col * CELL : MARGIN + col * CELL + CELL - 1] = True
    assert (frame[~lit] == 0).all()
    assert lit.sum() == GRID * GRID * (CELL - 1) ** 2


@pytest.mark.slow
def test_breakout_frames_show_the_game():
    env, get_obs = envs.make("Breakout-MinAtar"), jax.jit(breakout.MinBreakout().get_obs)
    obs, state = env.reset(jax.random.key(0))
    frame = np.asarray(obs[..., -1])
    s = state.physics
    # Three rows of bricks, the paddle on the bottom row, the ball where the state says.
    assert all((cell_pixels(frame, r, c) == BRICK).all() for r in (1, 2) for c in range(GRID))
    assert (cell_pixels(frame, 9, int(s.pos)) == PADDLE).all()
    assert (cell_pixels(frame, int(s.ball_y), int(s.ball_x)) == BALL).all()
    np.testing.assert_array_equal(frame, np.asarray(render_minatar(get_obs(s))))
    # The ball moves every step, so every frame differs from the one before; the trail shows where
    # it was (under a brick, the brick shows).
    for t in range(5):
        obs, state, reward, terminated, truncated, info = env.step(jax.random.key(t), state, 0)
        assert not bool(terminated)
        new, s = np.asarray(obs[..., -1]), state.physics
        assert not np.array_equal(new, frame)
        np.testing.assert_array_equal(new, np.asarray(render_minatar(get_obs(s))))
        assert (cell_pixels(new, int(s.ball_y), int(s.ball_x)) == BALL).all()
        trail = BRICK if s.brick_map[int(s.last_y), int(s.last_x)] else TRAIL
        assert (cell_pixels(new, int(s.last_y), int(s.last_x)) == trail).all()
        frame = new


def test_render_minatar_checks_its_input():
    with pytest.raises(ValueError, match="4 channels but 3 levels"):
        render_minatar(np.zeros((GRID, GRID, 4), np.float32), levels=(1.0, 2.0, 3.0))
    bad = np.zeros((GRID, GRID, 4), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="obs must be finite"):
        render_minatar(bad)
    frame = np.asarray(jax.jit(render_minatar)(jnp.asarray(bad)))
    assert (frame == 255).all()
