"""64x64 grey renderers for gymnax's classic-control tasks: Acrobot, MountainCar (both kinds), Pendulum.

Each task has a public `render_*` (concrete values: a NaN or infinite state is a ValueError; under
jit it is drawn as an all-white frame, as `cartpole.render` does) and a `*_frame(state, params)`
that `PixelEnv` calls inside jit. The pictures follow gym's own renderers (the same geometry and
orientation, in grey levels) so a person recognises the task; the levels are distinct per part so
a world model can tell the parts apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wm_jax.envs.draw import (
    FRAME_SIZE,
    box_distance,
    check_finite,
    coverage,
    disc_distance,
    finish,
    paint,
    pixel_grid,
    segment_distance,
)

_CENTRE = (FRAME_SIZE - 1) / 2.0

# Acrobot: gym draws the pivot in the middle, links of 1 unit hanging down at angle 0, and a line
# 1 unit above the pivot that the tip must pass. 13.5 px per unit keeps both links (2 units = 27 px)
# inside the frame at every angle.
_ACRO_PX = 13.5
_ACRO_HALF_W = 2.0
_ACRO_PIVOT_R = 2.5
_ACRO_LINE, _ACRO_LINK1, _ACRO_LINK2, _ACRO_PIVOT = 90.0, 170.0, 255.0, 120.0

# MountainCar: gym's hill y = 0.45 sin(3x) + 0.55 over x in [-1.2, 0.6], drawn with the same scale on
# both axes (so slopes look as steep as they are), filled below the curve.
_MC_MIN_X, _MC_MAX_X = -1.2, 0.6
_MC_LEFT = 2.0
_MC_PX = (FRAME_SIZE - 1 - 2 * _MC_LEFT) / (_MC_MAX_X - _MC_MIN_X)  # 32.8 px per unit
_MC_BASE = 64.0  # row of height y = 0: the lowest point of the hill (y = 0.1) lies at row 60.7
_MC_WHEEL_R, _MC_BODY_HALF_W, _MC_BODY_HALF_H = 1.5, 4.5, 2.0
_MC_FLAG_H = 10.0
_MC_HILL, _MC_FLAG, _MC_WHEEL, _MC_CAR = 70.0, 150.0, 170.0, 255.0

# Pendulum: gym draws a rod of 1 unit from a central pivot, upright at theta = 0, positive theta
# turning counter-clockwise.
_PEND_LEN = 24.0
_PEND_HALF_W = 3.0
_PEND_PIVOT_R = 2.0
_PEND_ROD, _PEND_PIVOT = 200.0, 90.0


def _draw_acrobot(theta1: jax.Array, theta2: jax.Array) -> jax.Array:
    rows, cols = pixel_grid()
    theta1 = jnp.asarray(theta1, jnp.float32)
    theta2 = jnp.asarray(theta2, jnp.float32)
    pivot = (_CENTRE, _CENTRE)
    # gym: p1 = (sin t1, -cos t1), p2 = p1 + (sin(t1 + t2), -cos(t1 + t2)) in (x, y up).
    elbow = (pivot[0] + _ACRO_PX * jnp.cos(theta1), pivot[1] + _ACRO_PX * jnp.sin(theta1))
    tip = (elbow[0] + _ACRO_PX * jnp.cos(theta1 + theta2), elbow[1] + _ACRO_PX * jnp.sin(theta1 + theta2))

    image = jnp.zeros((FRAME_SIZE, FRAME_SIZE), jnp.float32)
    image = paint(image, coverage(jnp.abs(rows - (_CENTRE - _ACRO_PX)) - 0.5), _ACRO_LINE)
    image = paint(image, coverage(segment_distance(rows, cols, pivot, elbow) - _ACRO_HALF_W), _ACRO_LINK1)
    image = paint(image, coverage(segment_distance(rows, cols, elbow, tip) - _ACRO_HALF_W), _ACRO_LINK2)
    image = paint(image, coverage(disc_distance(rows, cols, pivot, _ACRO_PIVOT_R)), _ACRO_PIVOT)
    return finish(image, theta1, theta2)


def _hill_row(x: jax.Array) -> jax.Array:
    return _MC_BASE - _MC_PX * (0.45 * jnp.sin(3.0 * x) + 0.55)


def _hill_point(x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """((row, col) of the hill at position x, the slope's angle on the screen)."""
    col = _MC_LEFT + _MC_PX * (x - _MC_MIN_X)
    return (_hill_row(x), col), jnp.arctan(1.35 * jnp.cos(3.0 * x))


def _draw_mountain_car(position: jax.Array, goal_position: jax.Array) -> jax.Array:
    rows, cols = pixel_grid()
    position = jnp.asarray(position, jnp.float32)
    goal_position = jnp.asarray(goal_position, jnp.float32)
    # The hill: signed distance to the region below the curve, to first order in the slope.
    col_x = _MC_MIN_X + (cols - _MC_LEFT) / _MC_PX
    slope = 1.35 * jnp.cos(3.0 * col_x)
    hill = coverage((_hill_row(col_x) - rows) / jnp.sqrt(1.0 + slope * slope))

    (flag_r, flag_c), _ = _hill_point(goal_position)
    pole = coverage(segment_distance(rows, cols, (flag_r, flag_c), (flag_r - _MC_FLAG_H, flag_c)) - 0.5)
    flag = coverage(box_distance(rows, cols, (flag_r - _MC_FLAG_H + 1.5, flag_c + 2.5), 1.5, 2.5))

    # The car stands on the hill, turned with the slope: wheels touching it, the body above them.
    (ground_r, ground_c), angle = _hill_point(position)
    up_r, up_c = -jnp.cos(angle), -jnp.sin(angle)  # the slope's normal, (row, col)
    along_r, along_c = -jnp.sin(angle), jnp.cos(angle)  # the slope's direction, (row, col)
    lift = 2.0 * _MC_WHEEL_R + _MC_BODY_HALF_H - 1.0
    body = (ground_r + lift * up_r, ground_c + lift * up_c)
    car = coverage(box_distance(rows, cols, body, _MC_BODY_HALF_H, _MC_BODY_HALF_W, angle))
    wheels = jnp.zeros_like(car)
    for side in (-1.0, 1.0):
        axle = (
            ground_r + _MC_WHEEL_R * up_r + side * 2.8 * along_r,
            ground_c + _MC_WHEEL_R * up_c + side * 2.8 * along_c,
        )
        wheels = jnp.maximum(wheels, coverage(disc_distance(rows, cols, axle, _MC_WHEEL_R)))

    image = paint(jnp.zeros((FRAME_SIZE, FRAME_SIZE), jnp.float32), hill, _MC_HILL)
    image = paint(image, jnp.maximum(pole, flag), _MC_FLAG)
    image = paint(image, car, _MC_CAR)
    image = paint(image, wheels, _MC_WHEEL)
    return finish(image, position, goal_position)


def _draw_pendulum(theta: jax.Array) -> jax.Array:
    rows, cols = pixel_grid()
    theta = jnp.asarray(theta, jnp.float32)
    pivot = (_CENTRE, _CENTRE)
    # gym: the rod's end is (-sin theta, cos theta) in (x, y up).
    end = (_CENTRE - _PEND_LEN * jnp.cos(theta), _CENTRE - _PEND_LEN * jnp.sin(theta))
    image = jnp.zeros((FRAME_SIZE, FRAME_SIZE), jnp.float32)
    image = paint(image, coverage(segment_distance(rows, cols, pivot, end) - _PEND_HALF_W), _PEND_ROD)
    image = paint(image, coverage(disc_distance(rows, cols, pivot, _PEND_PIVOT_R)), _PEND_PIVOT)
    return finish(image, theta)


_draw_acrobot_jit = jax.jit(_draw_acrobot)
_draw_mountain_car_jit = jax.jit(_draw_mountain_car)
_draw_pendulum_jit = jax.jit(_draw_pendulum)


def render_acrobot(theta1: jax.Array, theta2: jax.Array) -> jax.Array:
    """Acrobot with joint angles `theta1` (from hanging straight down) and `theta2` (relative).

    uint8[64, 64]: the goal line 1 unit above the pivot (90), the first link (170), the second link
    (255, the one whose tip must pass the line) and the fixed pivot (120), on black.
    """
    check_finite("render_acrobot", theta1=theta1, theta2=theta2)
    return _draw_acrobot_jit(theta1, theta2)


def render_mountain_car(position: jax.Array, goal_position: jax.Array = 0.5) -> jax.Array:
    """MountainCar with the car at `position` (in [-1.2, 0.6]) and the flag at `goal_position`.

    uint8[64, 64]: the filled hill (70), the flag (150), the car's body (255) turned with the slope
    and its wheels (170), on black. MountainCar-v0's goal is at 0.5, the continuous task's at 0.45.
    """
    check_finite("render_mountain_car", position=position, goal_position=goal_position)
    return _draw_mountain_car_jit(position, goal_position)


def render_pendulum(theta: jax.Array) -> jax.Array:
    """Pendulum at angle `theta` (0 upright, counter-clockwise positive): the rod (200) and the pivot
    (90) on black. gym also draws an arrow for the last torque; it is left out so that the frame is
    a function of the state alone, as every other task's is."""
    check_finite("render_pendulum", theta=theta)
    return _draw_pendulum_jit(theta)


def acrobot_frame(state, params) -> jax.Array:
    """The frame of a gymnax Acrobot state (for PixelEnv)."""
    return _draw_acrobot(state.joint_angle1, state.joint_angle2)


def mountain_car_frame(state, params) -> jax.Array:
    """The frame of a gymnax MountainCar or ContinuousMountainCar state, flag at the params' goal."""
    return _draw_mountain_car(state.position, params.goal_position)


def pendulum_frame(state, params) -> jax.Array:
    """The frame of a gymnax Pendulum state (for PixelEnv)."""
    return _draw_pendulum(state.theta)
