"""Episode collection on device: behaviour policies, the memory rule, and `collect`.

`collect` runs many CartPole episodes as one jitted, vmapped, fixed-length `lax.scan` with a
validity mask (gymnax `experimental/rollout.py` style), in chunks of episodes so memory stays
bounded, and returns the rows as a `datasets.Dataset` in data.py's schema (one row per step).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import datasets
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from wm_jax import interrupt
from wm_jax.envs.cartpole import FRAME_SIZE, PixelCartPole, push_frame, render
from wm_jax.store import data


# --------------------------------------------------------------------------------------------
# Policies


@dataclasses.dataclass(frozen=True)
class Policy:
    """A behaviour policy for `collect`, gymnax-style: static code, traced parameters.

    act(params, key, carry, obs) -> (action int32, carry) for ONE episode (collect vmaps it); params
    is collect's `params` pytree, an argument of the compiled program, never a constant in it (one
    program for every round's agent); obs is the uint8[64, 64, 4] stack when `uses_pixels`, else
    None (and no frames are rendered in the loop). init_carry() -> the policy's per-episode state
    (a pytree; `()` for a stateless policy).
    """

    act: Callable[[Any, jax.Array, Any, jax.Array | None], tuple[jax.Array, Any]]
    init_carry: Callable[[], Any] = lambda: ()
    uses_pixels: bool = False


def _random_act(params: Any, key: jax.Array, carry: Any, obs: jax.Array | None) -> tuple[jax.Array, Any]:
    return jax.random.bernoulli(key).astype(jnp.int32), carry


RANDOM_POLICY = Policy(act=_random_act)


# --------------------------------------------------------------------------------------------
# Collection


def _collect_chunk(policy: Policy, max_steps: int, key: jax.Array, num_episodes: int, params: Any
                   ) -> dict[str, jax.Array]:
    """One chunk of episodes as a fixed-length scan; returns time-major buffers and a valid mask."""
    env = PixelCartPole()
    env_params = env.default_params

    def one_episode(key: jax.Array) -> dict[str, jax.Array]:
        key_reset, key_run = jax.random.split(key)
        obs, state = env.reset(key_reset, env_params)

        def body(carry, key_t):
            state, pcarry, alive = carry
            key_act, key_step = jax.random.split(key_t)
            action, pcarry = policy.act(params, key_act, pcarry, state.frames if policy.uses_pixels else None)
            action = jnp.asarray(action, jnp.int32)
            phys = state.physics
            # gymnax's step_env without auto-reset: after termination the mask takes over.
            nxt, reward, terminated = env.step_physics(key_step, phys, action, env_params)
            frames = state.frames
            if policy.uses_pixels:  # static: only pixel policies pay for rendering in the loop
                frames = push_frame(frames, nxt)
            out = {
                "valid": alive,
                "action": action,
                "reward": reward.astype(jnp.float32),
                "done": terminated & alive,
                "state": jnp.stack([phys.x, phys.x_dot, phys.theta, phys.theta_dot]).astype(jnp.float32),
            }
            alive = alive & ~terminated
            new_state = state.replace(physics=nxt, frames=frames)
            return (new_state, pcarry, alive), out

        keys = jax.random.split(key_run, max_steps)
        _, out = jax.lax.scan(body, (state, policy.init_carry(), jnp.array(True)), keys)
        return out

    return jax.vmap(one_episode)(jax.random.split(key, num_episodes))


_collect_chunk_jit = jax.jit(_collect_chunk, static_argnums=(0, 1, 3))


@jax.jit
def _render_batch(states: jax.Array) -> jax.Array:
    return jax.vmap(render)(states[:, 0], states[:, 2])


def render_states(states: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Render uint8[N, 64, 64] frames for float[N, 4] physics states, in fixed-size batches."""
    n = states.shape[0]
    out = np.empty((n, FRAME_SIZE, FRAME_SIZE), np.uint8)
    for lo in range(0, n, batch):
        part = states[lo : lo + batch]
        pad = batch - part.shape[0]
        padded = np.concatenate([part, np.zeros((pad, 4), np.float32)]) if pad else part
        out[lo : lo + part.shape[0]] = np.asarray(_render_batch(jnp.asarray(padded)))[: part.shape[0]]
    return out


ROW_BYTES = FRAME_SIZE * FRAME_SIZE + 4 * 4 + 4 * 5  # a frame, the state, episode/t/action/reward/done
RANDOM_EPISODE_STEPS = 22.5  # mean length of a random-policy CartPole episode (measured: 22.4 over 5,000)
# What one step of one episode takes in a chunk's scan, whether the episode is still running or not:
# its key (8 bytes), the outputs valid, action, reward, done and state (26 bytes) on the device, and
# the same outputs again on the host after device_get.
SCAN_STEP_BYTES = 8 + 2 * 26


class TooLarge(ValueError):
    """A collection that cannot fit in this machine's memory."""


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where POSIX cannot tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(num_episodes: int, max_steps: int, policy: Policy = RANDOM_POLICY, chunk_size: int | None = None,
                 max_rows: int | None = None) -> None:
    """Refuse, before any work, a collection that would not fit in half of this machine's memory.
    The rule: the rows it keeps (all held until saved: episodes x steps x ROW_BYTES, random
    episodes counted at their mean length, other policies' at max_steps, at most max_rows) plus one
    chunk's scan buffers (chunk episodes x max_steps x SCAN_STEP_BYTES: the scan runs max_steps
    for every episode, ended or not) must stay within half of the physical memory."""
    have = memory_bytes()
    if have is None:  # not POSIX: no estimate
        return
    chunk = num_episodes if chunk_size is None else min(chunk_size, num_episodes)
    steps = min(max_steps, RANDOM_EPISODE_STEPS) if policy is RANDOM_POLICY else max_steps
    rows = num_episodes * steps if max_rows is None else min(num_episodes * steps, max_rows)
    kept, scan = rows * ROW_BYTES, chunk * max_steps * SCAN_STEP_BYTES
    if kept + scan > have / 2:
        gib = 2**30
        raise TooLarge(f"{num_episodes:,} episodes of at most {max_steps:,} steps need about {(kept + scan) / gib:,.1f} "
                       f"GiB in memory ({kept / gib:,.1f} GiB of rows kept at {steps:g} steps of {ROW_BYTES:,} bytes, "
                       f"{scan / gib:,.1f} GiB of scan buffers for {chunk:,} episodes at a time), more than half of "
                       f"this machine's {have / gib:.1f} GiB: collect fewer episodes (in several datasets) or lower "
                       f"--max-steps")


def _chunks(
    key: jax.Array, num_episodes: int, policy: Policy, max_steps: int = 500, chunk_size: int = 1000,
    episode_offset: int = 0, progress: bool = True, max_rows: int | None = None, params: Any = None,
):
    """Yield each chunk's rows as a dict of numpy columns (frames rendered), in episode order; with
    max_rows, no more rows than that in all (see `collect`)."""
    if max_rows is not None and max_rows <= 0:
        raise ValueError(f"max_rows must be positive or None, got {max_rows}")
    if num_episodes <= 0:
        raise ValueError(f"num_episodes must be positive, got {num_episodes}")
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    check_memory(num_episodes, max_steps, policy, chunk_size, max_rows)
    chunk_size = min(chunk_size, num_episodes)
    num_chunks = -(-num_episodes // chunk_size)
    bar = tqdm(total=num_episodes, desc="collect", unit="ep", disable=not progress, leave=False)
    for c in range(num_chunks):
        interrupt.check()  # Ctrl-C between chunks
        # Every chunk has the same size (one compile); surplus episodes of the last are dropped.
        out = jax.device_get(_collect_chunk_jit(policy, max_steps, jax.random.fold_in(key, c), chunk_size, params))
        keep = min(chunk_size, num_episodes - c * chunk_size)
        valid = out["valid"][:keep]  # [E, T]
        ep, t = np.nonzero(valid)  # row-major: episode-major, time ascending
        if max_rows is not None:  # the budget's last episode is cut where the budget ends
            ep, t = ep[:max_rows], t[:max_rows]
            max_rows -= ep.size
        cols = {
            "episode": (ep + c * chunk_size + episode_offset).astype(np.int32),
            "t": t.astype(np.int32),
            "action": out["action"][:keep][ep, t].astype(np.int32),
            "reward": out["reward"][:keep][ep, t].astype(np.float32),
            "done": out["done"][:keep][ep, t].astype(bool),
            "state": out["state"][:keep][ep, t].astype(np.float32),
        }
        cols["frame"] = render_states(cols["state"])
        bar.update(keep)
        yield {k: cols[k] for k in data.COLUMNS}
        if max_rows == 0:
            break
    bar.close()


def collect_arrays(key: jax.Array, num_episodes: int, policy: Policy = RANDOM_POLICY, **options: Any
                   ) -> dict[str, np.ndarray]:
    """`collect` without the Dataset wrapper: a dict of numpy columns, one row per step; `options`
    are collect's (max_steps, chunk_size, episode_offset, progress, max_rows, params)."""
    parts = list(_chunks(key, num_episodes, policy, **options))
    return {k: np.concatenate([p[k] for p in parts]) for k in data.COLUMNS}


def collect(
    key: jax.Array,
    num_episodes: int = 5000,
    policy: Policy = RANDOM_POLICY,
    max_steps: int = 500,
    chunk_size: int = 1000,
    episode_offset: int = 0,
    progress: bool = True,
    max_rows: int | None = None,
    params: Any = None,
) -> datasets.Dataset:
    """Run `num_episodes` episodes of `policy` (default: uniform random) and return a Dataset.

    With `max_rows`, the collection holds that many steps at most: in episode order, the episode
    that reaches the budget is cut there (a time limit: its last row has no done) and the episodes
    after it are dropped. A chunk's episodes run side by side, so the dropped rows were simulated,
    but they are discarded and not counted: the data and the count are those of an agent stopped
    at the budget.

    All episodes of a chunk run in one jitted program: a fixed-length scan of `max_steps` with a
    validity mask, vmapped over episodes. Frames are rendered afterwards from the stored states
    (`render` is a pure function of (x, theta)), so the random policy never renders dead steps.
    Each chunk becomes a Dataset (`Dataset.from_dict`) as soon as it is collected and the chunks
    are concatenated, so peak memory grows with the chunk, not the collection.
    The recipe's dataset is `collect(jax.random.key(123), 5000)`.
    """
    parts = [
        datasets.Dataset.from_dict(cols, features=data.FEATURES)
        for cols in _chunks(key, num_episodes, policy, max_steps, chunk_size, episode_offset, progress, max_rows,
                            params)
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
