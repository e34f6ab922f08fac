"""Drawing primitives shared by the pixel renderers: anti-aliased shapes as signed distances.

Every shape is a signed distance in pixels from each pixel centre (negative inside), turned into a
coverage in [0, 1] by a 1 px ramp (`coverage`). Coverage is continuous in the shape's position, so
a sub-pixel move of the state still changes the frame, which a world model needs to see velocity.
Everything here is pure jnp on traced values: it jits and vmaps.

Coordinates are (row, col) in pixels, rows growing downwards; angles are in radians and turn
counter-clockwise on the screen (y up), as gym's renderers draw them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FRAME_SIZE = 64  # every frame is uint8[FRAME_SIZE, FRAME_SIZE]
STACK = 4  # observations stack the last STACK frames, newest last
WHITE = 255.0  # the level of a frame drawn from a state that is not finite


def pixel_grid() -> tuple[jax.Array, jax.Array]:
    """(rows, cols), each float32[64, 64]: the coordinates of every pixel centre."""
    index = jnp.arange(FRAME_SIZE, dtype=jnp.float32)
    return jnp.meshgrid(index, index, indexing="ij")


def coverage(signed_distance: jax.Array) -> jax.Array:
    """Approximate pixel coverage from a signed distance in pixels (1 px anti-aliasing ramp)."""
    return jnp.clip(0.5 - signed_distance, 0.0, 1.0)


def segment_distance(rows: jax.Array, cols: jax.Array, start, end) -> jax.Array:
    """Distance from each pixel centre to the segment start-end ((row, col) points).

    A capsule of half width w is `coverage(segment_distance(...) - w)`.
    """
    (r0, c0), (r1, c1) = start, end
    dr, dc = r1 - r0, c1 - c0
    length2 = jnp.maximum(dr * dr + dc * dc, 1e-12)  # a zero-length segment is a point
    t = jnp.clip(((rows - r0) * dr + (cols - c0) * dc) / length2, 0.0, 1.0)
    return jnp.hypot(rows - r0 - t * dr, cols - c0 - t * dc)


def disc_distance(rows: jax.Array, cols: jax.Array, centre, radius) -> jax.Array:
    """Signed distance to a disc of `radius` pixels around `centre` (row, col)."""
    return jnp.hypot(rows - centre[0], cols - centre[1]) - radius


def box_distance(rows: jax.Array, cols: jax.Array, centre, half_height, half_width, angle=0.0) -> jax.Array:
    """Signed distance to a rectangle around `centre` (row, col), turned by `angle`.

    The box signed distance of Inigo Quilez (outside length plus inside max) in the box's own
    axes: u along its width, v along its height (up on the screen when angle is 0).
    """
    rel_r, rel_c = rows - centre[0], cols - centre[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    u = rel_c * cos - rel_r * sin
    v = -rel_c * sin - rel_r * cos
    dx = jnp.abs(u) - half_width
    dy = jnp.abs(v) - half_height
    return jnp.hypot(jnp.maximum(dx, 0.0), jnp.maximum(dy, 0.0)) + jnp.minimum(jnp.maximum(dx, dy), 0.0)


def paint(image: jax.Array, cover: jax.Array, level: float) -> jax.Array:
    """`image` with a shape of grey `level` painted over it where `cover` (0..1) says."""
    return image + cover * (level - image)


def finish(image: jax.Array, *state: jax.Array) -> jax.Array:
    """The float image as uint8[64, 64]; all white when any state value is not finite.

    A state that is not finite has no picture: under jit nothing can be raised, so it is drawn
    white, never as a plausible frame.
    """
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(jnp.asarray(v, jnp.float32))) for v in state]))
    return jnp.round(jnp.where(finite, image, WHITE)).astype(jnp.uint8)


def check_finite(caller: str, **values) -> None:
    """Raise ValueError naming the variable when a concrete (not traced) value is not finite."""
    for name, value in values.items():
        if not isinstance(value, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(value, np.float32))):
            raise ValueError(f"{caller}: {name} must be finite, got {value!r}")
