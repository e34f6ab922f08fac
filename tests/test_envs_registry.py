"""Tests for wm_jax.envs' registry and every registered pixel environment: the gymnax API under jit,
vmap and scan, physics and rewards equal to gymnax's own step, the specs against gymnax and
gymnasium, and a user's own environment registered with a render function (offline, CPU)."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from gymnax.environments import environment, spaces
from gymnax.environments.classic_control import acrobot, cartpole, continuous_mountain_car, mountain_car, pendulum
from gymnax.environments.minatar import breakout

from wm_jax import envs
from wm_jax.envs.cartpole import render as cartpole_render
from wm_jax.envs.draw import coverage, disc_distance, finish, pixel_grid

BUILTIN = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "MountainCarContinuous-v0", "Breakout-MinAtar")
GYMNAX = {
    "CartPole-v1": cartpole.CartPole,
    "Acrobot-v1": acrobot.Acrobot,
    "MountainCar-v0": mountain_car.MountainCar,
    "Pendulum-v1": pendulum.Pendulum,
    "MountainCarContinuous-v0": continuous_mountain_car.ContinuousMountainCar,
    "Breakout-MinAtar": breakout.MinBreakout,
}


def random_actions(space: envs.ActionSpace, key: jax.Array, n: int) -> jax.Array:
    if space.kind == "discrete":
        return jax.random.randint(key, (n,), 0, space.n)
    return jax.random.uniform(key, (n, *space.shape), minval=space.low, maxval=space.high)


def assert_trees_equal(a: Any, b: Any) -> None:
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


# ---------------------------------------------------------------------------------------------
# The registry


def test_builtin_names_in_order():
    assert envs.names()[: len(BUILTIN)] == BUILTIN


def test_unknown_name_is_a_one_line_error_listing_the_known_names():
    for call in (envs.make, envs.spec):
        with pytest.raises(ValueError) as err:
            call("CartPole-v0")
        message = str(err.value)
        assert "\n" not in message and "'CartPole-v0'" in message
        assert all(name in message for name in BUILTIN)


def test_make_returns_one_instance_per_name():
    assert envs.make("Acrobot-v1") is envs.make("Acrobot-v1")
    assert type(envs.make("CartPole-v1")).__name__ == "PixelCartPole"
    assert isinstance(envs.make("Pendulum-v1"), envs.PixelEnv)


@pytest.mark.parametrize("name", BUILTIN)
def test_spec_matches_what_gymnax_declares(name):
    spec, gx = envs.spec(name), GYMNAX[name]()
    params = gx.default_params
    assert spec.name == name
    assert spec.action_space == envs.ActionSpace.of(gx.action_space(params))
    assert spec.max_steps == int(params.max_steps_in_episode)
    if spec.action_space.kind == "discrete":
        assert spec.action_space.n == gx.num_actions


@pytest.mark.parametrize("name", BUILTIN[:5])
def test_spec_matches_gymnasium(name):
    gym = pytest.importorskip("gymnasium")
    spec, reference = envs.spec(name), gym.spec(name)
    assert spec.solved_threshold == reference.reward_threshold  # None for Pendulum-v1
    assert spec.max_steps == reference.max_episode_steps
    space = gym.make(name).action_space
    if spec.action_space.kind == "discrete":
        assert spec.action_space.n == space.n
    else:
        assert spec.action_space.shape == space.shape
        assert np.all(space.low == spec.action_space.low) and np.all(space.high == spec.action_space.high)


def test_solved_thresholds():
    thresholds = {name: envs.spec(name).solved_threshold for name in BUILTIN}
    assert thresholds == {"CartPole-v1": 475.0, "Acrobot-v1": -100.0, "MountainCar-v0": -110.0,
                          "Pendulum-v1": None, "MountainCarContinuous-v0": 90.0, "Breakout-MinAtar": None}


def test_action_space_of_gymnax_spaces():
    assert envs.ActionSpace.of(spaces.Discrete(4)) == envs.ActionSpace("discrete", n=4)
    box = envs.ActionSpace.of(spaces.Box(-2.0, 2.0, (1,)))
    assert box == envs.ActionSpace("continuous", low=-2.0, high=2.0, shape=(1,))
    uneven = envs.ActionSpace.of(spaces.Box(jnp.array([-1.0, 0.0]), jnp.array([1.0, 3.0]), (2,)))
    assert uneven.low == (-1.0, 0.0) and uneven.high == (1.0, 3.0) and uneven.shape == (2,)
    with pytest.raises(ValueError, match="Discrete and Box"):
        envs.ActionSpace.of(spaces.Dict({"a": spaces.Discrete(2)}))


# ---------------------------------------------------------------------------------------------
# Every registered environment: the API, and gymnax's physics


# Compiling CartPole's and Breakout's batched reset and step takes over 2 s on a 2-core CPU.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("CartPole-v1", "Breakout-MinAtar")
                                  else n for n in BUILTIN])
def test_reset_and_step_under_jit_and_vmap(name):
    env, space = envs.make(name), envs.spec(name).action_space
    keys = jax.random.split(jax.random.key(1), 3)
    obs, state = jax.jit(jax.vmap(env.reset))(keys)
    assert obs.shape == (3, 64, 64, 4) and obs.dtype == jnp.uint8
    actions = random_actions(space, jax.random.key(2), 3)
    out = jax.jit(jax.vmap(env.step))(keys, state, actions)
    assert len(out) == 6
    new_obs, new_state, reward, terminated, truncated, info = out
    assert new_obs.shape == (3, 64, 64, 4) and new_obs.dtype == jnp.uint8
    assert reward.shape == terminated.shape == truncated.shape == (3,)
    # The newest frame moved in, the oldest out; the state changed, and so did the picture.
    np.testing.assert_array_equal(np.asarray(new_obs[..., :3]), np.asarray(obs[..., 1:]))
    assert all(not np.array_equal(np.asarray(new_obs[i, ..., -1]), np.asarray(obs[i, ..., -1])) for i in range(3))
    # The first observation repeats its frame.
    for k in range(1, 4):
        np.testing.assert_array_equal(np.asarray(obs[..., k]), np.asarray(obs[..., 0]))


def _rollout(name: str, steps: int, params: Any):
    """The pixel env and gymnax's own env, stepped side by side with the same keys and actions."""
    env, gx = envs.make(name), GYMNAX[name]()
    if name == "CartPole-v1":
        frame = lambda physics: cartpole_render(physics.x, physics.theta)
    else:
        frame = lambda physics: env.frame(physics, params)
    keys = jax.random.split(jax.random.key(7), steps)
    actions = random_actions(envs.spec(name).action_space, jax.random.key(8), steps)

    @jax.jit
    def run(reset_key):
        obs, state = env.reset(reset_key, params)
        _, gx_state = gx.reset(reset_key, params)

        def body(carry, xs):
            state, gx_state = carry
            k, a = xs
            obs, state, reward, term, trunc, info = env.step(k, state, a, params)
            _, gx_state, gx_reward, gx_term, gx_trunc, gx_info = gx.step(k, gx_state, a, params)
            ours = (state.physics, reward, term, trunc)
            theirs = (gx_state, gx_reward, gx_term, gx_trunc)
            newest = (frame(state.physics), frame(info["final_state"]))
            return (state, gx_state), (ours, theirs, obs, info["final_observation"], newest)

        return obs, state, gx_state, jax.lax.scan(body, (state, gx_state), (keys, actions))

    return run(jax.random.key(6))


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN)
def test_physics_and_rewards_are_gymnax_own_step(name):
    """Through terminations and truncations (an 8-step limit): every state, reward and flag equals
    what gymnax's own `step` returns for the same key and action; the newest frame draws the state."""
    params = GYMNAX[name]().default_params.replace(max_steps_in_episode=8)
    obs0, state0, gx_state0, (_, (ours, theirs, obs, final_obs, newest)) = _rollout(name, 80, params)
    assert_trees_equal(state0.physics, gx_state0)
    assert_trees_equal(ours, theirs)
    term, trunc = np.asarray(ours[2]), np.asarray(ours[3])
    ended = term | trunc
    assert ended.sum() >= 10 and trunc.any(), "80 steps with an 8-step limit end 10 episodes, some by the limit"
    # The newest frame draws the state; after an end the obs is the fresh episode's first frame four
    # times, and the final stack (in info) draws the final state.
    obs, final_obs = np.asarray(obs), np.asarray(final_obs)
    np.testing.assert_array_equal(obs[..., -1], np.asarray(newest[0]))
    np.testing.assert_array_equal(final_obs[..., -1], np.asarray(newest[1]))
    for t in np.flatnonzero(ended):
        assert (obs[t] == obs[t, ..., :1]).all()
    np.testing.assert_array_equal(obs[~ended], final_obs[~ended])


@pytest.mark.parametrize("name", BUILTIN[1:])
def test_no_retrace_across_reset_step_and_auto_reset(name):
    chex.clear_trace_counter()  # chex counts traces per function across the parametrized cases
    env = envs.make(name)
    params = env.default_params.replace(max_steps_in_episode=3)
    space = envs.spec(name).action_space

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(key, state, action):
        return env.step(key, state, action, params)

    _, state = env.reset(jax.random.key(0), params)
    actions = random_actions(space, jax.random.key(1), 5)
    for i in range(5):  # the third step truncates: the fourth starts from an auto-reset state
        _, state, *_ = step(jax.random.key(10 + i), state, actions[i])


# ---------------------------------------------------------------------------------------------
# A user's own environment


@struct.dataclass
class ToyState(environment.EnvState):
    x: jax.Array
    time: int


@struct.dataclass
class ToyParams(environment.EnvParams):
    speed: float = 0.25
    max_steps_in_episode: int = 20


class Toy(environment.Environment):
    """A point on a line pushed left (0) or right (1); it ends past |x| > 1; reward -|x| per step."""

    @property
    def default_params(self) -> ToyParams:
        return ToyParams()

    def step_env(self, key, state, action, params):
        x = state.x + params.speed * (2.0 * action - 1.0)
        state = ToyState(x=x, time=state.time + 1)
        return jnp.array([x]), state, -jnp.abs(x), jnp.abs(x) > 1.0, {}

    def reset_env(self, key, params):
        state = ToyState(x=jax.random.uniform(key, (), minval=-0.5, maxval=0.5), time=0)
        return jnp.array([state.x]), state

    def action_space(self, params=None):
        return spaces.Discrete(2)


def toy_frame(state, params):
    rows, cols = pixel_grid()
    return finish(255.0 * coverage(disc_distance(rows, cols, (31.5, 31.5 + 20.0 * state.x), 4.0)), state.x)


def test_register_a_toy_environment():
    spec = envs.register("Toy-v0", Toy(), toy_frame, solved_threshold=-5.0, overwrite=True)
    assert spec == envs.spec("Toy-v0") and "Toy-v0" in envs.names()
    assert spec.action_space == envs.ActionSpace.discrete(2)
    assert (spec.solved_threshold, spec.max_steps) == (-5.0, 20)
    with pytest.raises(ValueError, match="already registered"):
        envs.register("Toy-v0", Toy(), toy_frame)

    env = envs.make("Toy-v0")
    obs, state = env.reset(jax.random.key(0))
    assert obs.shape == (64, 64, 4) and obs.dtype == jnp.uint8
    # Pushing right moves the ball right by 0.25 * 20 = 5 px a step, until it leaves |x| <= 1.
    col = lambda frame: (np.asarray(frame, float) * np.arange(64)).sum() / np.asarray(frame, float).sum()
    x0, c0 = float(state.physics.x), col(obs[..., -1])
    assert c0 == pytest.approx(31.5 + 20 * x0, abs=0.05)
    for t in range(1, 10):
        obs, state, reward, terminated, truncated, info = env.step(jax.random.key(t), state, 1)
        x = x0 + 0.25 * t
        assert float(reward) == pytest.approx(-abs(x), abs=1e-6)
        if bool(terminated):
            assert x > 1.0 and float(info["final_state"].x) == pytest.approx(x, abs=1e-6)
            break
        assert col(obs[..., -1]) == pytest.approx(31.5 + 20 * x, abs=0.05)
    else:
        raise AssertionError("the toy episode did not end")


def test_register_reads_a_continuous_action_space_and_checks_the_frame():
    class ToyContinuous(Toy):
        def action_space(self, params=None):
            return spaces.Box(-1.0, 1.0, (1,))

    spec = envs.register("ToyContinuous-v0", ToyContinuous(), lambda s, p: toy_frame(s, p).astype(jnp.float32),
                         overwrite=True)
    assert spec.action_space == envs.ActionSpace.continuous(-1.0, 1.0, (1,)) and spec.solved_threshold is None
    with pytest.raises(ValueError, match=r"frame_fn must return uint8\[64, 64\], got float32\[64, 64\]"):
        envs.make("ToyContinuous-v0").reset(jax.random.key(0))
