"""Frames of every registered pixel environment under a random policy, as one PNG grid.

    python experiments/env_frames.py [--out docs/images/envs.png] [--steps 40] [--columns 6] [--seed 0]

One row per environment (wm_jax.envs.names()): one episode of uniformly random actions (discrete:
each action equally likely; continuous: uniform within the action space's bounds) up to `--steps`
steps or its end, `--columns` evenly spaced frames of it from the first to the last (the step that
ends an episode shows its final frame, info["final_observation"]), each the newest frame of the
observation, drawn 3x with nearest neighbour.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw

from wm_jax import envs

SCALE = 3
GAP = 4
LABEL_H = 14


def random_action(space: envs.ActionSpace, key: jax.Array) -> jax.Array:
    if space.kind == "discrete":
        return jax.random.randint(key, (), 0, space.n)
    return jax.random.uniform(key, space.shape, minval=space.low, maxval=space.high)


def frames_of(name: str, key: jax.Array, steps: int, columns: int) -> list[tuple[int, np.ndarray]]:
    """(step, newest frame) at `columns` evenly spaced steps of one random episode of `name`."""
    env, space = envs.make(name), envs.spec(name).action_space
    key, reset_key = jax.random.split(key)
    obs, state = env.reset(reset_key)
    frames = [np.asarray(obs[..., -1])]
    for _ in range(steps):
        key, k_act, k_step = jax.random.split(key, 3)
        obs, state, _, terminated, truncated, info = env.step(k_step, state, random_action(space, k_act))
        frames.append(np.asarray(info["final_observation"][..., -1]))
        if bool(terminated) or bool(truncated):
            break
    picks = np.unique(np.linspace(0, len(frames) - 1, columns).round().astype(int))
    return [(int(t), frames[t]) for t in picks]


def grid(rows: list[tuple[str, list[tuple[int, np.ndarray]]]], columns: int) -> Image.Image:
    side = 64 * SCALE
    width = columns * (side + GAP) + GAP
    height = len(rows) * (side + LABEL_H + GAP) + GAP
    image = Image.new("L", (width, height), 40)
    draw = ImageDraw.Draw(image)
    for r, (name, frames) in enumerate(rows):
        top = GAP + r * (side + LABEL_H + GAP)
        for c, (step, frame) in enumerate(frames[:columns]):
            left = GAP + c * (side + GAP)
            label = f"{name}  t={step}" if c == 0 else f"t={step}"
            draw.text((left, top), label, fill=255)
            tile = Image.fromarray(frame).resize((side, side), Image.NEAREST)
            image.paste(tile, (left, top + LABEL_H))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/envs.png")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(args.seed), len(envs.names()))
    rows = [(name, frames_of(name, key, args.steps, args.columns)) for name, key in zip(envs.names(), keys)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, args.columns).save(out)
    print(f"wrote {out}: {len(rows)} environments x {args.columns} frames")


if __name__ == "__main__":
    main()
