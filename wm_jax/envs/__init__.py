"""Pixel environments: gymnax physics and rewards, rendered to 64x64 frames inside XLA.

`make(name)` returns a task's pixel environment (gymnax 1.x API, uint8[64, 64, 4] observations,
newest frame last) and `spec(name)` its EnvSpec (action space, solved threshold, step limit);
`register(name, gymnax_env, render_fn)` adds a user's own task. Modules: cartpole (CartPole-v1),
classic (Acrobot, MountainCar, Pendulum), minatar (Breakout-MinAtar), pixel (the generic wrapper),
draw (the shared anti-aliased shapes), registry, states (a task's state as a stored vector,
and its frame drawn back from it: `codec(name)`). docs/ENVIRONMENTS.md shows every task.
"""

from wm_jax.envs.pixel import PixelEnv, PixelState
from wm_jax.envs.registry import ActionSpace, EnvSpec, make, most_return, names, register, spec
from wm_jax.envs.states import StateCodec, codec

__all__ = ["ActionSpace", "EnvSpec", "PixelEnv", "PixelState", "StateCodec", "codec", "make", "most_return", "names",
           "register", "spec"]
