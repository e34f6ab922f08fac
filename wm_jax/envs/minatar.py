"""MinAtar games at 64x64: gymnax's own 10x10 channel observation drawn as grey levels.

MinAtar observes a 10x10 grid with one binary channel per kind of object. `render_minatar` gives
each channel a grey level and draws every cell as a 6x6 px square (nearest neighbour) lit on 5x5 px,
with a 1 px black seam so that neighbouring objects (a row of bricks) stay apart; the 60x60 board is
centred in the 64x64 frame with a 2 px black margin. Whole-pixel cells keep every square the same
size, which a 64/10 stretch would not. Where channels overlap the brightest level is drawn, so the
levels also set which object shows on top.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from wm_jax.envs.draw import FRAME_SIZE, check_finite, finish

GRID = 10  # MinAtar's board is GRID x GRID cells
CELL = 6  # pixels per cell side
MARGIN = (FRAME_SIZE - GRID * CELL) // 2  # 2 px of black around the board

# Breakout-MinAtar's channels, in gymnax's order: paddle, ball, trail (where the ball was one step
# ago, which shows its direction), brick. The ball is brightest so it shows over anything.
BREAKOUT_LEVELS = (190.0, 255.0, 70.0, 130.0)


def _draw_minatar(obs: jax.Array, levels: Sequence[float]) -> jax.Array:
    obs = jnp.asarray(obs, jnp.float32)
    offset = jnp.arange(FRAME_SIZE) - MARGIN
    cell = offset // CELL
    inside = (cell >= 0) & (cell < GRID) & (offset % CELL != CELL - 1)  # the seam is each cell's last pixel
    cell = jnp.clip(cell, 0, GRID - 1)
    board = jnp.max(obs * jnp.asarray(levels, jnp.float32), axis=-1)  # [10, 10]
    image = board[cell[:, None], cell[None, :]]
    image = jnp.where(inside[:, None] & inside[None, :], image, 0.0)
    return finish(image, obs)


_draw_minatar_jit = jax.jit(_draw_minatar, static_argnums=1)


def render_minatar(obs: jax.Array, levels: Sequence[float] = BREAKOUT_LEVELS) -> jax.Array:
    """A MinAtar observation float[10, 10, C] (0/1 per channel) as uint8[64, 64].

    Channel c is drawn at grey level `levels[c]` (C levels, distinct, in 1..255), the brightest where
    channels overlap. MinAtar's states are integers and cannot be NaN; an observation that is not
    finite is still refused (ValueError when concrete, all white under jit), as for every renderer.
    """
    if len(levels) != obs.shape[-1]:
        raise ValueError(f"render_minatar: {obs.shape[-1]} channels but {len(levels)} levels")
    check_finite("render_minatar", obs=obs)
    return _draw_minatar_jit(obs, tuple(float(v) for v in levels))


def minatar_frame(env: Any, levels: Sequence[float]) -> Callable[[Any, Any], jax.Array]:
    """The frame function (state, params) -> uint8[64, 64] of gymnax MinAtar game `env` (for PixelEnv):
    the game's own observation, drawn with `levels`."""
    levels = tuple(float(v) for v in levels)

    def frame(state: Any, params: Any) -> jax.Array:
        return _draw_minatar(env.get_obs(state), levels)

    return frame
