"""Tests for wm_jax.envs.classic: the Acrobot, MountainCar and Pendulum renderers, and the pixel
environments' physics against gymnasium's (offline, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax import envs
from wm_jax.envs.classic import render_acrobot, render_mountain_car, render_pendulum

CENTRE = 31.5
ACRO_LINE, ACRO_LINK1, ACRO_LINK2 = 90, 170, 255
MC_HILL, MC_CAR = 70, 255
PEND_ROD = 200


def img(render, *state) -> np.ndarray:
    frame = np.asarray(render(*state))
    assert frame.shape == (64, 64) and frame.dtype == np.uint8
    return frame


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(row, col) centre of the True pixels."""
    rows, cols = np.nonzero(mask)
    assert rows.size, "no pixel of that level"
    return rows.mean(), cols.mean()


# ---------------------------------------------------------------------------------------------
# Renderers


def test_acrobot_geometry():
    # Hanging straight down (the start): both links below the pivot, the goal line above it.
    down = img(render_acrobot, 0.0, 0.0)
    line_rows = np.nonzero((down == ACRO_LINE).all(axis=1))[0]
    assert line_rows.size and abs(line_rows.mean() - (CENTRE - 13.5)) <= 0.5
    r2, c2 = centroid(down == ACRO_LINK2)
    assert r2 > CENTRE + 13.5 and abs(c2 - CENTRE) < 0.5
    # Swung up (theta1 = pi): the second link passes the goal line, as the task asks.
    up = img(render_acrobot, np.pi, 0.0)
    assert centroid(up == ACRO_LINK2)[0] < CENTRE - 13.5
    # theta1 > 0 swings the arm to the right (gym: x = sin theta1); bending the elbow moves only link 2.
    assert centroid(img(render_acrobot, 0.5, 0.0) == ACRO_LINK2)[1] > CENTRE + 5
    bent = img(render_acrobot, 0.0, 1.0)
    assert centroid(bent == ACRO_LINK2)[1] > CENTRE + 5
    np.testing.assert_allclose(centroid(bent == ACRO_LINK1), centroid(down == ACRO_LINK1), atol=0.5)


@pytest.mark.parametrize("t1, t2", [(0.3, 0.0), (0.7, -1.1), (2.5, 0.4)])
def test_acrobot_mirror_symmetry(t1, t2):
    right, left = img(render_acrobot, t1, t2).astype(int), img(render_acrobot, -t1, -t2).astype(int)
    assert np.abs(np.fliplr(left) - right).max() <= 1


def test_mountain_car_geometry():
    # The hill is the same in every frame; the car climbs it left to right.
    frames = [img(render_mountain_car, x) for x in np.linspace(-1.2, 0.6, 19)]
    hill = [(f == MC_HILL).sum() for f in frames]
    assert min(hill) > 0.8 * max(hill)
    cols = np.array([centroid(f == MC_CAR)[1] for f in frames])
    assert (np.diff(cols) > 0).all(), cols
    rows = np.array([centroid(f == MC_CAR)[0] for f in frames])
    # Highest near the goal (x = 0.5), lowest in the valley (x = -pi / 6).
    assert rows.argmin() >= 16 and 6 <= rows.argmax() <= 12
    # The flag stands at the goal: MountainCar-v0's at 0.5, the continuous task's at 0.45.
    moved = img(render_mountain_car, -0.5, 0.45).astype(int) - img(render_mountain_car, -0.5, 0.5).astype(int)
    assert np.abs(moved).max() > 0
    assert np.abs(moved[40:]).max() == 0, "only the flag (above the hill's low part) moves"


def test_pendulum_geometry():
    up, down = img(render_pendulum, 0.0), img(render_pendulum, np.pi)
    assert centroid(up == PEND_ROD)[0] < CENTRE - 5 and centroid(down == PEND_ROD)[0] > CENTRE + 5
    # Positive theta turns counter-clockwise: at pi / 2 the rod points left.
    assert centroid(img(render_pendulum, np.pi / 2) == PEND_ROD)[1] < CENTRE - 5
    # theta is not wrapped by gymnax's physics: the frame depends on it modulo 2 pi.
    assert np.abs(img(render_pendulum, 0.4 + 4 * np.pi).astype(int) - img(render_pendulum, 0.4).astype(int)).max() <= 1
    assert np.abs(np.fliplr(img(render_pendulum, -0.8)).astype(int) - img(render_pendulum, 0.8).astype(int)).max() <= 1


@pytest.mark.parametrize(
    "render, grid",
    [
        (lambda v: render_acrobot(v, 0.3), np.linspace(-np.pi, np.pi, 301)[:-1]),
        (lambda v: render_acrobot(0.3, v), np.linspace(-np.pi, np.pi, 301)[:-1]),
        (render_mountain_car, np.linspace(-1.2, 0.6, 181)),
        (render_pendulum, np.linspace(-np.pi, np.pi, 301)[:-1]),
    ],
)
def test_distinct_states_give_distinct_frames(render, grid):
    """Angles 0.02 rad apart, positions 0.01 apart (a third of a pixel): every frame differs."""
    frames = np.asarray(jax.vmap(render)(jnp.asarray(grid, jnp.float32)))
    assert frames.dtype == np.uint8 and frames.shape == (len(grid), 64, 64)
    assert len({f.tobytes() for f in frames}) == len(grid)


@pytest.mark.parametrize(
    "render, state, name",
    [
        (render_acrobot, (float("nan"), 0.0), "theta1"),
        (render_acrobot, (0.0, float("inf")), "theta2"),
        (render_mountain_car, (float("nan"),), "position"),
        (render_pendulum, (float("-inf"),), "theta"),
    ],
)
def test_renderers_refuse_a_state_that_is_not_finite(render, state, name):
    """Eagerly a ValueError naming the variable; under jit an all-white frame."""
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        render(*state)
    frame = np.asarray(jax.jit(render)(*(jnp.float32(v) for v in state)))
    assert (frame == 255).all()


# ---------------------------------------------------------------------------------------------
# Physics parity with gymnasium


def state_vec(name: str, s) -> jax.Array:
    """gymnasium's `state` layout of a gymnax state."""
    if name == "Acrobot-v1":
        return jnp.stack([s.joint_angle1, s.joint_angle2, s.velocity_1, s.velocity_2])
    if name == "Pendulum-v1":
        return jnp.stack([s.theta, s.theta_dot])
    return jnp.stack([s.position, s.velocity])


def policy(name: str, kind: str):
    """(key, gymnax state) -> action, in JAX."""
    space = envs.spec(name).action_space
    if kind == "random" and space.kind == "discrete":
        return lambda key, s: jax.random.randint(key, (), 0, space.n)
    if kind == "random":
        return lambda key, s: jax.random.uniform(key, space.shape, minval=space.low, maxval=space.high)
    if kind == "swing":  # Acrobot: torque with the elbow's velocity reaches the goal in ~100 steps
        return lambda key, s: jnp.where(s.velocity_2 > 0, 2, 0)
    if kind == "pump":  # MountainCar: push along the velocity (reaches the goal in ~120 steps)
        return lambda key, s: jnp.where(s.velocity >= 0, 2, 0)
    if kind == "pump_gently":  # MountainCarContinuous: likewise, pushing back gently enough to miss the wall
        return lambda key, s: jnp.where(s.velocity >= 0, 1.0, -0.2).reshape(1).astype(jnp.float32)
    raise ValueError(kind)


def gymnax_episode(name: str, kind: str, seed: int):
    """One episode (and what follows its end, up to the step limit) of the pixel env under `kind`:
    per step the state before, the action, the state after, its gymnax observation, reward, flags."""
    env, act = envs.make(name), policy(name, kind)
    steps = envs.spec(name).max_steps

    @jax.jit
    def run(key):
        _, state = env.reset(key)

        def body(state, key):
            k_act, k_step = jax.random.split(key)
            a = act(k_act, state.physics)
            _, new, reward, term, trunc, info = env.step(k_step, state, a)
            final = info["final_state"]
            return new, (state_vec(name, state.physics), a, state_vec(name, final), env.env.get_obs(final),
                         reward, term, trunc)

        return jax.lax.scan(body, state, jax.random.split(jax.random.fold_in(key, 1), steps))[1]

    return [np.asarray(v) for v in run(jax.random.key(seed))]


# Lockstep: gymnasium (float64) steps from gymnax's start with the same actions, running freely for
# `free` steps (None: the whole episode) and after that put back to gymnax's state before every step
# (one-step parity). Acrobot and Pendulum amplify the difference of float32 (gymnax) and float64
# (gymnasium) rounding: it passed 1e-4 after 79 steps of Acrobot's swinging policy, 486 of Acrobot's
# random actions and 78 of Pendulum's random torques, so those run freely for their first 50, 100
# and 50 steps. MountainCarContinuous is checked on episodes that do not touch the left wall, where
# gymnax differs (next test).
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kind, free, end",
    [
        ("Acrobot-v1", "random", 100, "time"),
        ("Acrobot-v1", "swing", 50, "goal"),
        ("MountainCar-v0", "random", None, "time"),
        ("MountainCar-v0", "pump", None, "goal"),
        ("Pendulum-v1", "random", 50, "time"),
        ("MountainCarContinuous-v0", "random", None, "time"),
        ("MountainCarContinuous-v0", "pump_gently", None, "goal"),
    ],
)
def test_physics_parity_with_gymnasium(name, kind, free, end):
    gym = pytest.importorskip("gymnasium")
    genv = gym.make(name)  # with its TimeLimit wrapper
    for seed in (0, 1):
        before, actions, after, obs, rewards, term, trunc = gymnax_episode(name, kind, seed)
        genv.reset(seed=seed)
        genv.unwrapped.state = before[0].astype(np.float64)
        for t in range(len(actions)):
            if free is not None and t >= free:
                genv.unwrapped.state = before[t].astype(np.float64)
            g_obs, g_reward, g_term, g_trunc, _ = genv.step(actions[t] if actions[t].ndim else int(actions[t]))
            msg = f"{name} {kind} seed {seed} step {t + 1}"
            np.testing.assert_allclose(obs[t], g_obs, rtol=0, atol=1e-4, err_msg=msg)
            np.testing.assert_allclose(rewards[t], g_reward, rtol=0, atol=1e-4, err_msg=msg)
            assert (bool(term[t]), bool(trunc[t])) == (g_term, g_trunc), msg
            if g_term or g_trunc:
                break
        if name == "MountainCarContinuous-v0":
            assert after[: t + 1, 0].min() > -1.2, "the episode touched the left wall"
        assert (g_term, g_trunc) == ((True, False) if end == "goal" else (False, True)), msg
        assert t + 1 == envs.spec(name).max_steps or end == "goal"
    genv.close()


@pytest.mark.slow
def test_continuous_mountain_car_left_wall_differs_from_gymnasium():
    """gymnax 1.0's ContinuousMountainCar zeroes a negative velocity at the goal position, not at the
    left wall (`position >= goal_position` where gymnasium has `position == min_position`): at the
    wall gymnasium stops the car and gymnax keeps its velocity, held at -1.2 until it turns. The
    pixel env keeps gymnax's physics; this pins the difference, so a gymnax fix shows here."""
    gym = pytest.importorskip("gymnasium")
    genv = gym.make("MountainCarContinuous-v0")
    genv.reset(seed=0)
    env, key = envs.make("MountainCarContinuous-v0"), jax.random.key(3)
    _, state = env.reset(key)
    state = state.replace(physics=state.physics.replace(position=jnp.float32(-0.3)))  # from here pushing left reaches the wall
    genv.unwrapped.state = np.asarray(state_vec("MountainCarContinuous-v0", state.physics), np.float64)
    push_left = jnp.array([-1.0], jnp.float32)
    for t in range(1, 200):
        _, state, *_ = env.step(jax.random.fold_in(key, t), state, push_left)
        genv.step(np.asarray(push_left))
        ours, theirs = float(state.physics.position), float(genv.unwrapped.state[0])
        if ours <= -1.2:
            break
        assert ours == pytest.approx(theirs, abs=1e-5), t
    else:
        raise AssertionError("pushing left never reached the wall")
    assert theirs == pytest.approx(-1.2) and genv.unwrapped.state[1] == 0.0
    assert float(state.physics.velocity) < 0.0  # gymnax: still moving left at the wall
