"""Episode collection on device: behaviour policies, the memory rule, and `collect`.

`collect` runs many episodes of a task of wm_jax.envs as one jitted, vmapped, fixed-length
`lax.scan` with a validity mask (gymnax `experimental/rollout.py` style), in chunks of episodes so
memory stays bounded, and returns the rows as a `datasets.Dataset` in data.py's schema for the task
(one row per step).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import datasets
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from wm_jax import envs, interrupt
from wm_jax.envs.draw import FRAME_SIZE
from wm_jax.envs.registry import ActionSpace
from wm_jax.store import data


# --------------------------------------------------------------------------------------------
# Policies


@dataclasses.dataclass(frozen=True)
class Policy:
    """A behaviour policy for `collect`, gymnax-style: static code, traced parameters.

    act(params, key, carry, obs) -> (action, carry) for ONE episode (collect vmaps it): an int32 for
    a discrete task, a float32 vector for a continuous one; params is collect's `params` pytree, an
    argument of the compiled program, never a constant in it (one program for every round's agent);
    obs is the uint8[64, 64, 4] stack when `uses_pixels`, else None (and no frames are rendered in
    the loop). init_carry() -> the policy's per-episode state (a pytree; `()` for a stateless
    policy). mean_steps: the policy's measured mean episode length where known (the memory rule
    counts episodes at it; None: at max_steps).
    """

    act: Callable[[Any, jax.Array, Any, jax.Array | None], tuple[jax.Array, Any]]
    init_carry: Callable[[], Any] = lambda: ()
    uses_pixels: bool = False
    mean_steps: float | None = None


def random_action(space: ActionSpace, key: jax.Array) -> jax.Array:
    """A uniformly random action of `space`: an int32 in [0, n), or a float32 vector in [low, high].
    Two actions are drawn as a Bernoulli coin (the draws CartPole's data has always had)."""
    if space.kind == "continuous":
        low, high = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), space.shape) for b in (space.low, space.high))
        return jax.random.uniform(key, space.shape, jnp.float32, low, high)
    if space.n == 2:
        return jax.random.bernoulli(key).astype(jnp.int32)
    return jax.random.randint(key, (), 0, space.n, jnp.int32)


RANDOM_EPISODE_STEPS = 22.5  # mean length of a random-policy CartPole episode (measured: 22.4 over 5,000)


@functools.lru_cache(maxsize=None)
def random_policy(space: ActionSpace, mean_steps: float | None = None) -> Policy:
    """The uniform random policy of `space` (one Policy, so one compiled collection, per space)."""

    def act(params: Any, key: jax.Array, carry: Any, obs: jax.Array | None) -> tuple[jax.Array, Any]:
        return random_action(space, key), carry

    return Policy(act=act, mean_steps=mean_steps)


RANDOM_POLICY = random_policy(envs.spec(data.DEFAULT_ENV).action_space, RANDOM_EPISODE_STEPS)  # CartPole's


def task_random_policy(env: str) -> Policy:
    """Task `env`'s random policy (CartPole's with its measured episode length)."""
    return RANDOM_POLICY if env == data.DEFAULT_ENV else random_policy(envs.spec(env).action_space)


# --------------------------------------------------------------------------------------------
# Collection


def _collect_chunk(policy: Policy, max_steps: int, key: jax.Array, num_episodes: int, params: Any, env_name: str
                   ) -> dict[str, jax.Array]:
    """One chunk of episodes as a fixed-length scan; returns time-major buffers and a valid mask."""
    env = envs.make(env_name)
    env_params = env.default_params
    flatten = envs.codec(env_name).flatten
    discrete = envs.spec(env_name).action_space.kind == "discrete"

    def one_episode(key: jax.Array) -> dict[str, jax.Array]:
        key_reset, key_run = jax.random.split(key)
        obs, state = env.reset(key_reset, env_params)

        def body(carry, key_t):
            state, pcarry, alive = carry
            key_act, key_step = jax.random.split(key_t)
            action, pcarry = policy.act(params, key_act, pcarry, state.frames if policy.uses_pixels else None)
            action = jnp.asarray(action, jnp.int32 if discrete else jnp.float32)
            phys = state.physics
            # gymnax's step_env without auto-reset: after termination the mask takes over.
            nxt, reward, terminated = env.step_physics(key_step, phys, action, env_params)
            frames = state.frames
            if policy.uses_pixels:  # static: only pixel policies pay for rendering in the loop
                frames = env.push_frame(frames, nxt, env_params)
            out = {
                "valid": alive,
                "action": action,
                "reward": jnp.asarray(reward, jnp.float32),
                "done": terminated & alive,
                "state": flatten(phys),
            }
            alive = alive & ~terminated
            new_state = state.replace(physics=nxt, frames=frames)
            return (new_state, pcarry, alive), out

        keys = jax.random.split(key_run, max_steps)
        _, out = jax.lax.scan(body, (state, policy.init_carry(), jnp.array(True)), keys)
        return out

    return jax.vmap(one_episode)(jax.random.split(key, num_episodes))


_collect_chunk_jit = jax.jit(_collect_chunk, static_argnums=(0, 1, 3, 5))


@functools.partial(jax.jit, static_argnums=1)
def _render_batch(states: jax.Array, env: str) -> jax.Array:
    return jax.vmap(envs.codec(env).frame)(states)


def render_states(states: np.ndarray, batch: int = 4096, env: str = data.DEFAULT_ENV) -> np.ndarray:
    """Render uint8[N, 64, 64] frames for task `env`'s stored states float[N, codec size]
    (`envs.codec`), in fixed-size batches."""
    n = states.shape[0]
    out = np.empty((n, FRAME_SIZE, FRAME_SIZE), np.uint8)
    for lo in range(0, n, batch):
        part = states[lo : lo + batch]
        pad = batch - part.shape[0]
        padded = np.concatenate([part, np.zeros((pad, part.shape[1]), np.float32)]) if pad else part
        out[lo : lo + part.shape[0]] = np.asarray(_render_batch(jnp.asarray(padded), env))[: part.shape[0]]
    return out


def _state_and_action_bytes(env: str) -> int:
    space = envs.spec(env).action_space
    return 4 * envs.codec(env).size + 4 * (1 if space.kind == "discrete" else int(np.prod(space.shape)))


def row_bytes(env: str = data.DEFAULT_ENV) -> int:
    """What one stored row of task `env` takes: a frame, the state, the action, episode/t/reward/done."""
    return FRAME_SIZE * FRAME_SIZE + _state_and_action_bytes(env) + 4 * 4


def scan_step_bytes(env: str = data.DEFAULT_ENV) -> int:
    """What one step of one episode takes in a chunk's scan, whether the episode is still running or
    not: its key (8 bytes), the outputs valid, action, reward, done and state on the device, and
    the same outputs again on the host after device_get."""
    return 8 + 2 * (_state_and_action_bytes(env) + 6)


ROW_BYTES = row_bytes()  # CartPole's
SCAN_STEP_BYTES = scan_step_bytes()


class TooLarge(ValueError):
    """A collection that cannot fit in this machine's memory."""


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where POSIX cannot tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(num_episodes: int, max_steps: int, policy: Policy = RANDOM_POLICY, chunk_size: int | None = None,
                 max_rows: int | None = None, env: str = data.DEFAULT_ENV) -> None:
    """Refuse, before any work, a collection that would not fit in half of this machine's memory.
    The rule: the rows it keeps (all held until saved: episodes x steps x row_bytes(env), episodes
    counted at the policy's mean_steps where known, else at max_steps, at most max_rows) plus one
    chunk's scan buffers (chunk episodes x max_steps x scan_step_bytes(env): the scan runs max_steps
    for every episode, ended or not) must stay within half of the physical memory."""
    have = memory_bytes()
    if have is None:  # not POSIX: no estimate
        return
    chunk = num_episodes if chunk_size is None else min(chunk_size, num_episodes)
    steps = max_steps if policy.mean_steps is None else min(max_steps, policy.mean_steps)
    rows = num_episodes * steps if max_rows is None else min(num_episodes * steps, max_rows)
    row = row_bytes(env)
    kept, scan = rows * row, chunk * max_steps * scan_step_bytes(env)
    if kept + scan > have / 2:
        gib = 2**30
        raise TooLarge(f"{num_episodes:,} episodes of at most {max_steps:,} steps need about {(kept + scan) / gib:,.1f} "
                       f"GiB in memory ({kept / gib:,.1f} GiB of rows kept at {steps:g} steps of {row:,} bytes, "
                       f"{scan / gib:,.1f} GiB of scan buffers for {chunk:,} episodes at a time), more than half of "
                       f"this machine's {have / gib:.1f} GiB: collect fewer episodes (in several datasets) or lower "
                       f"--max-steps")


def _chunks(
    key: jax.Array, num_episodes: int, policy: Policy, max_steps: int = 500, chunk_size: int = 1000,
    episode_offset: int = 0, progress: bool = True, max_rows: int | None = None, params: Any = None,
    env: str = data.DEFAULT_ENV,
):
    """Yield each chunk's rows as a dict of numpy columns (frames rendered), in episode order; with
    max_rows, no more rows than that in all (see `collect`)."""
    discrete = envs.spec(env).action_space.kind == "discrete"
    if max_rows is not None and max_rows <= 0:
        raise ValueError(f"max_rows must be positive or None, got {max_rows}")
    if num_episodes <= 0:
        raise ValueError(f"num_episodes must be positive, got {num_episodes}")
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    check_memory(num_episodes, max_steps, policy, chunk_size, max_rows, env)
    if max_steps > envs.spec(env).max_steps:  # the scan watches terminations, not gymnax's truncation
        raise ValueError(f"max_steps={max_steps} is past {env}'s step limit ({envs.spec(env).max_steps})")
    chunk_size = min(chunk_size, num_episodes)
    num_chunks = -(-num_episodes // chunk_size)
    bar = tqdm(total=num_episodes, desc="collect", unit="ep", disable=not progress, leave=False)
    for c in range(num_chunks):
        interrupt.check()  # Ctrl-C between chunks
        # Every chunk has the same size (one compile); surplus episodes of the last are dropped.
        out = jax.device_get(_collect_chunk_jit(policy, max_steps, jax.random.fold_in(key, c), chunk_size, params,
                                                env))
        keep = min(chunk_size, num_episodes - c * chunk_size)
        valid = out["valid"][:keep]  # [E, T]
        ep, t = np.nonzero(valid)  # row-major: episode-major, time ascending
        if max_rows is not None:  # the budget's last episode is cut where the budget ends
            ep, t = ep[:max_rows], t[:max_rows]
            max_rows -= ep.size
        cols = {
            "episode": (ep + c * chunk_size + episode_offset).astype(np.int32),
            "t": t.astype(np.int32),
            "action": out["action"][:keep][ep, t].astype(np.int32 if discrete else np.float32),
            "reward": out["reward"][:keep][ep, t].astype(np.float32),
            "done": out["done"][:keep][ep, t].astype(bool),
            "state": out["state"][:keep][ep, t].astype(np.float32),
        }
        cols["frame"] = render_states(cols["state"], env=env)
        bar.update(keep)
        yield {k: cols[k] for k in data.COLUMNS}
        if max_rows == 0:
            break
    bar.close()


def collect_arrays(key: jax.Array, num_episodes: int, policy: Policy | None = None, **options: Any
                   ) -> dict[str, np.ndarray]:
    """`collect` without the Dataset wrapper: a dict of numpy columns, one row per step; `options`
    are collect's (max_steps, chunk_size, episode_offset, progress, max_rows, params, env)."""
    policy = task_random_policy(options.get("env", data.DEFAULT_ENV)) if policy is None else policy
    parts = list(_chunks(key, num_episodes, policy, **options))
    return {k: np.concatenate([p[k] for p in parts]) for k in data.COLUMNS}


def collect(
    key: jax.Array,
    num_episodes: int = 5000,
    policy: Policy | None = None,
    max_steps: int = 500,
    chunk_size: int = 1000,
    episode_offset: int = 0,
    progress: bool = True,
    max_rows: int | None = None,
    params: Any = None,
    env: str = data.DEFAULT_ENV,
) -> datasets.Dataset:
    """Run `num_episodes` episodes of task `env` under `policy` (default: the task's uniform random
    policy) and return a Dataset in the task's schema (`data.features(env)`; save it with
    `data.save_dataset(..., env=env)`). `max_steps` must stay within the task's step limit: the scan
    ends episodes at their termination, and at max_steps as a time limit (a last row without done).

    With `max_rows`, the collection holds that many steps at most: in episode order, the episode
    that reaches the budget is cut there (a time limit: its last row has no done) and the episodes
    after it are dropped. A chunk's episodes run side by side, so the dropped rows were simulated,
    but they are discarded and not counted: the data and the count are those of an agent stopped
    at the budget.

    All episodes of a chunk run in one jitted program: a fixed-length scan of `max_steps` with a
    validity mask, vmapped over episodes. Frames are rendered afterwards from the stored states
    (`envs.codec(env).frame`), so the random policy never renders dead steps.
    Each chunk becomes a Dataset (`Dataset.from_dict`) as soon as it is collected and the chunks
    are concatenated, so peak memory grows with the chunk, not the collection.
    The recipe's dataset is `collect(jax.random.key(123), 5000)`.
    """
    policy = task_random_policy(env) if policy is None else policy
    schema = data.features(env)
    parts = [
        datasets.Dataset.from_dict(cols, features=schema)
        for cols in _chunks(key, num_episodes, policy, max_steps, chunk_size, episode_offset, progress, max_rows,
                            params, env)
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
