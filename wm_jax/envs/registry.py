"""The environments wm_jax knows by name, and how to add one.

`make(name)` returns the pixel environment (gymnax API, uint8[64, 64, 4] observations) and
`spec(name)` its `EnvSpec`: the action space, gymnasium's solved threshold and the episode's step
limit. Built in: CartPole-v1 (`PixelCartPole`), Acrobot-v1, MountainCar-v0, Pendulum-v1,
MountainCarContinuous-v0 and Breakout-MinAtar. `register` adds a user's own gymnax environment
with a render function. Environments are built on first `make` and then reused, so their jitted
`reset` and `step` compile once per process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from gymnax.environments import spaces
from gymnax.environments.classic_control import acrobot, continuous_mountain_car, mountain_car, pendulum
from gymnax.environments.minatar import breakout

from wm_jax.envs.cartpole import PixelCartPole
from wm_jax.envs.classic import acrobot_frame, mountain_car_frame, pendulum_frame
from wm_jax.envs.minatar import BREAKOUT_LEVELS, minatar_frame
from wm_jax.envs.pixel import FrameFn, PixelEnv


@dataclasses.dataclass(frozen=True)
class ActionSpace:
    """Discrete (`n` actions 0..n-1) or continuous (a float array of `shape` within [low, high]).

    `low` and `high` are floats when one bound holds for every dimension, else tuples of floats
    (flattened in row-major order).
    """

    kind: str  # "discrete" or "continuous"
    n: int | None = None
    low: float | tuple[float, ...] | None = None
    high: float | tuple[float, ...] | None = None
    shape: tuple[int, ...] = ()

    @classmethod
    def discrete(cls, n: int) -> ActionSpace:
        return cls(kind="discrete", n=int(n))

    @classmethod
    def continuous(cls, low: Any, high: Any, shape: tuple[int, ...]) -> ActionSpace:
        return cls(kind="continuous", low=_bound(low), high=_bound(high), shape=tuple(int(s) for s in shape))

    @classmethod
    def of(cls, space: Any) -> ActionSpace:
        """The ActionSpace of a gymnax `spaces.Discrete` or `spaces.Box`."""
        if isinstance(space, spaces.Discrete):
            return cls.discrete(space.n)
        if isinstance(space, spaces.Box):
            return cls.continuous(space.low, space.high, space.shape)
        raise ValueError(f"action space {space!r}: only gymnax Discrete and Box are supported")


def _bound(value: Any) -> float | tuple[float, ...]:
    flat = np.asarray(value, np.float64).ravel()
    return float(flat[0]) if flat.size == 1 or np.all(flat == flat[0]) else tuple(float(v) for v in flat)


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What a task is: its name, how to build its pixel env, its action space, the mean episode
    return that counts as solved (gymnasium's `reward_threshold`; None where gymnasium gives none),
    the step limit of an episode (truncation), what each discrete action does (for captions; empty
    where the actions have no names, or are continuous), and the least and most one step can pay
    (a dataset's rewards are checked against it; None: any finite reward)."""

    name: str
    build: Callable[[], Any]
    action_space: ActionSpace
    solved_threshold: float | None
    max_steps: int
    action_names: tuple[str, ...] = ()
    reward_range: tuple[float, float] | None = None


_SPECS: dict[str, EnvSpec] = {}
_BUILT: dict[str, Any] = {}


def names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_SPECS)


def spec(name: str) -> EnvSpec:
    """The EnvSpec of `name`; an unknown name is a ValueError listing the known ones."""
    if name not in _SPECS:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(names())}")
    return _SPECS[name]


def most_return(name: str, max_steps: int) -> float:
    """The most one episode of task `name` can return within `max_steps` steps (from its
    reward_range: every step paying the most, or one step where the most is negative; infinite
    where the task gives no range)."""
    bounds = spec(name).reward_range
    if bounds is None:
        return float("inf")
    high = float(bounds[1])
    return high * max_steps if high >= 0 else high


def make(name: str) -> Any:
    """The pixel environment registered as `name` (one instance per name and process)."""
    entry = spec(name)
    if name not in _BUILT:
        _BUILT[name] = entry.build()
    return _BUILT[name]


def add(entry: EnvSpec, overwrite: bool = False) -> EnvSpec:
    """Register a ready EnvSpec (what `register` does after deriving one)."""
    if entry.name in _SPECS and not overwrite:
        raise ValueError(f"environment {entry.name!r} is already registered (pass overwrite=True to replace it)")
    _SPECS[entry.name] = entry
    _BUILT.pop(entry.name, None)
    return entry


def register(
    name: str,
    gymnax_env: Any,
    render_fn: FrameFn,
    *,
    solved_threshold: float | None = None,
    overwrite: bool = False,
) -> EnvSpec:
    """Register gymnax environment `gymnax_env`, observed through `render_fn`, as `name`.

    `gymnax_env` is an instance of a gymnax `Environment` (it provides `step_env`, `reset_env`,
    `is_truncated`, `default_params` and `action_space`). `render_fn(state, params)` draws its
    state as uint8[64, 64] in pure JAX (it runs inside jit and vmap); the helpers of
    `wm_jax.envs.draw` (signed-distance discs, boxes, capsules, `finish`) make an anti-aliased one
    in a few lines. `make(name)` then returns `PixelEnv(gymnax_env, render_fn)`: four stacked
    frames, gymnax's rewards, terminations, time limit and auto-reset.

    The action space and the step limit are read from the environment (`action_space` and
    `default_params.max_steps_in_episode`); `solved_threshold` is the mean return that counts as
    solving the task, None if it has none. A name already taken is a ValueError unless `overwrite`.

        import jax.numpy as jnp
        from wm_jax import envs
        from wm_jax.envs.draw import coverage, disc_distance, finish, pixel_grid

        def render(state, params):
            rows, cols = pixel_grid()
            ball = coverage(disc_distance(rows, cols, (31.5, 31.5 + 10 * state.x), 4.0))
            return finish(255.0 * ball, state.x)

        envs.register("MyTask-v0", MyGymnaxTask(), render, solved_threshold=100.0)
        env = envs.make("MyTask-v0")
    """
    params = gymnax_env.default_params
    entry = EnvSpec(
        name=name,
        build=lambda: PixelEnv(gymnax_env, render_fn),
        action_space=ActionSpace.of(gymnax_env.action_space(params)),
        solved_threshold=None if solved_threshold is None else float(solved_threshold),
        max_steps=int(params.max_steps_in_episode),
    )
    return add(entry, overwrite=overwrite)


def _breakout() -> PixelEnv:
    env = breakout.MinBreakout()
    return PixelEnv(env, minatar_frame(env, BREAKOUT_LEVELS))


# Thresholds and step limits are gymnasium's registrations (gymnasium/envs/__init__.py); Pendulum-v1
# has no reward_threshold there, and MinAtar games are not in gymnasium. Action spaces and step
# limits equal what gymnax's environments declare (tests/test_envs_registry.py checks both).
_BUILTINS = (
    EnvSpec("CartPole-v1", PixelCartPole, ActionSpace.discrete(2), 475.0, 500, ("left", "right"), (1.0, 1.0)),
    EnvSpec("Acrobot-v1", lambda: PixelEnv(acrobot.Acrobot(), acrobot_frame), ActionSpace.discrete(3), -100.0, 500,
            ("torque -1", "torque 0", "torque +1"), (-1.0, 0.0)),
    EnvSpec("MountainCar-v0", lambda: PixelEnv(mountain_car.MountainCar(), mountain_car_frame),
            ActionSpace.discrete(3), -110.0, 200, ("left", "none", "right"), (-1.0, -1.0)),
    # -(pi^2 + 0.1 * 8^2 + 0.001 * 2^2) = -16.2736 at worst (angle, speed and torque at their bounds)
    EnvSpec("Pendulum-v1", lambda: PixelEnv(pendulum.Pendulum(), pendulum_frame),
            ActionSpace.continuous(-2.0, 2.0, (1,)), None, 200, (), (-16.2737, 0.0)),
    # -0.1 action^2 per step within the bounds, +100 on the step that reaches the flag
    EnvSpec("MountainCarContinuous-v0",
            lambda: PixelEnv(continuous_mountain_car.ContinuousMountainCar(), mountain_car_frame),
            ActionSpace.continuous(-1.0, 1.0, (1,)), 90.0, 999, (), (-0.1, 100.0)),
    EnvSpec("Breakout-MinAtar", _breakout, ActionSpace.discrete(3), None, 1000, ("none", "left", "right"), (0.0, 1.0)),
)
for _builtin in _BUILTINS:
    add(_builtin)
