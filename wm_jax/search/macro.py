"""Macro-actions: a macro is a fixed pair of primitive CartPole moves (0 = left, 1 = right).

A macro controller is an ordinary C with one score per macro (ControllerConfig.actions): at every
macro boundary it picks a macro from (z, h), and both of the macro's primitives run. Two ways to
dream it (`STYLES`):
- "twice": the primitive M stepped twice per macro step: `imagination.imagine` with the step
  `twice` makes (two noise draws per macro, so n macro steps under given macros are `imagine`'s 2n
  steps under the flattened primitives);
- "macro_m": a macro-M, an ordinary M whose action input has len(macros) values
  (TransitionConfig.actions), trained with `transition.train` on `training_arrays` (one row per
  macro step) and dreamed with `imagination.imagine`, one step per macro.
`dream` / `scores` score a controller in either style's dreams (Ha's done rule: p_done > 0.5 ends
the dream, that step still counts); `episodes` runs it in the real environment. The macro set is an
argument everywhere (a tuple of pairs, static under jit), checked once by `validate`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import envs, sharding
from wm_jax.models import controller, imagination, transition, vae
from wm_jax.search import dream as dream_lib
from wm_jax.search import rollout
from wm_jax.config import Config
from wm_jax.envs.cartpole import NUM_ACTIONS, PixelCartPole

CARTPOLE = "CartPole-v1"  # the task whose moves macros pair (style_config refuses the others)

Macros = tuple[tuple[int, int], ...]
MACROS: Macros = ((0, 0), (0, 1), (1, 0), (1, 1))  # LL, LR, RL, RR
STYLES = ("twice", "macro_m")


def validate(macros: Any) -> Macros:
    """`macros` as a tuple of (first, second) primitive pairs; ValueError unless it is a non-empty
    sequence of distinct pairs of valid actions (integers in [0, NUM_ACTIONS))."""
    try:
        pairs = [tuple(m) for m in macros]
    except TypeError:
        raise ValueError(f"macros must be a sequence of (first, second) action pairs, got {macros!r}") from None
    if not pairs:
        raise ValueError("macros is empty: a macro controller needs at least one macro")
    out = []
    for pair in pairs:
        ok = len(pair) == 2 and all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                                    and 0 <= a < NUM_ACTIONS for a in pair)
        if not ok:
            raise ValueError(f"macro {pair!r} is not a pair of primitive actions in [0, {NUM_ACTIONS})")
        out.append((int(pair[0]), int(pair[1])))
    if len(set(out)) != len(out):
        raise ValueError(f"macros has duplicates: {tuple(out)!r}")
    return tuple(out)


def primitive_table(macros: Macros) -> np.ndarray:
    """int32[len(macros), 2]: row m holds macro m's two primitive actions."""
    return np.asarray(validate(macros), np.int32).reshape(-1, 2)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"macro dream style must be one of {STYLES}, got {style!r}")


def style_config(cfg: Config, style: str, macros: Macros) -> Config:
    """`cfg` for a style's macro controller: C scores len(macros) macros; for "macro_m", M's
    action input is a macro index too (macro-M), and so is K's, which judges M's transitions; for
    "twice" both stay primitive."""
    _check_style(style)
    if cfg.env != CARTPOLE:  # the macro set, its rows and its real episodes are CartPole's moves
        kind = envs.spec(cfg.env).action_space.kind
        raise ValueError(f"macro-actions are pairs of CartPole's moves; {cfg.env} has {kind} actions"
                         + (" (macro-actions need discrete ones)" if kind == "continuous" else ""))
    n = len(validate(macros))
    m_actions = NUM_ACTIONS if style == "twice" else n
    return dataclasses.replace(cfg, transition=dataclasses.replace(cfg.transition, actions=m_actions),
                               verifier=dataclasses.replace(cfg.verifier, actions=m_actions),
                               controller=dataclasses.replace(cfg.controller, actions=n))


def _check_config(cfg: Config, style: str, macros: Macros) -> None:
    _check_style(style)
    n = len(macros)
    if cfg.controller.actions != n:
        raise ValueError(f"controller.actions={cfg.controller.actions} but there are {n} macros (use style_config)")
    want = NUM_ACTIONS if style == "twice" else n
    for section in ("transition", "verifier"):
        got = getattr(cfg, section).actions
        if got != want:
            raise ValueError(f"style {style!r} needs {section}.actions={want}, got {got} (use style_config)")


def training_arrays(mean: Any, logvar: Any, columns: dict[str, Any], index: Any, macros: Macros = MACROS
                    ) -> dict[str, np.ndarray]:
    """macro-M's per-row arrays, in `transition.training_arrays`' format, from primitive rows.

    Every primitive row t of an episode starts one macro row, covering rows t and t + 1: its latent
    (mean, logvar) is row t's, its action the index of the pair (a_t, a_{t+1}) in `macros`, its
    reward r_t + r_{t+1} and its done whether the episode ended within the macro. Each episode is
    built in both phases, as two macro-episodes: t = 0, 2, 4, ... and then t = 1, 3, 5, ..., so no
    transition is wasted; each has its own is_first / is_last, and a macro row's next latent is
    the next row of its macro-episode (t + 2), as `transition.sequence_batch` reads it.
    The trailing lone step: in the phase where the episode's last row T - 1 starts a macro, that
    macro has one executed primitive. It keeps the row as it is (reward r_{T-1}, and done_{T-1}: the
    terminal signal stays, so the done head learns that the macro ends the episode) and gets the
    macro (a_{T-1}, a_{T-1}), or without it in `macros` the first macro starting with a_{T-1}:
    from that state any macro whose first move is a_{T-1} ends the episode after that move, whatever
    its second. It is its macro-episode's last row, so its own latent is never a target
    (`transition.loss` masks is_last rows' latent term). A pair of the data missing from `macros`
    (or a lone step no macro starts with) is a ValueError: such a step has no macro to be labelled with.
    Episodes must be contiguous runs of rows in time order (data.EpisodeIndex).
    """
    macros = validate(macros)
    is_first, is_last = np.asarray(index.is_first, bool), np.asarray(index.is_last, bool)
    n = is_first.size
    if n == 0 or not is_first[0]:
        raise ValueError("training_arrays needs rows that start with an episode's first row (is_first[0])")
    action = np.asarray(columns["action"]).astype(np.int64)
    reward = np.asarray(columns["reward"], np.float32)
    done = np.asarray(columns["done"], bool)
    rows = np.arange(n)
    episode = np.cumsum(is_first) - 1
    t = rows - np.flatnonzero(is_first)[episode]
    has_next = ~is_last
    nxt = np.minimum(rows + 1, n - 1)

    pair_index = np.full((NUM_ACTIONS, NUM_ACTIONS), -1, np.int64)
    for i, (a, b) in enumerate(macros):
        pair_index[a, b] = i
    lone_index = np.array([pair_index[a, a] if pair_index[a, a] >= 0
                           else next((i for i, m in enumerate(macros) if m[0] == a), -1) for a in range(NUM_ACTIONS)])
    macro = np.where(has_next, pair_index[action, action[nxt]], lone_index[action])
    if (macro < 0).any():
        bad = sorted({(int(action[r]), int(action[nxt[r]])) if has_next[r] else (int(action[r]),)
                      for r in np.flatnonzero(macro < 0)})
        raise ValueError(f"the data has moves no macro of {macros} covers: {bad}")
    m_reward = reward + np.where(has_next, reward[nxt], 0.0)
    m_done = done | (has_next & done[nxt])

    order = np.lexsort((t, t % 2, episode))  # by episode, then phase, then time
    group = (2 * episode + t % 2)[order]
    boundary = group[1:] != group[:-1]
    mean, logvar = np.asarray(mean), np.asarray(logvar)
    return {
        "mean": mean[order], "logvar": logvar[order], "action": macro[order].astype(np.int32),
        "reward": m_reward[order].astype(np.float32), "done": m_done[order],
        "is_first": np.concatenate([[True], boundary]), "is_last": np.concatenate([boundary, [True]]),
    }


def episode_macros(actions: np.ndarray, macros: Macros = MACROS) -> np.ndarray:
    """Macro indices of consecutive primitive pairs of `actions` [..., 2n]: [..., n], -1 where a pair
    is not in `macros`."""
    macros = validate(macros)
    pair_index = np.full((NUM_ACTIONS, NUM_ACTIONS), -1, np.int32)
    for i, (a, b) in enumerate(macros):
        pair_index[a, b] = i
    a = np.asarray(actions, np.int64)
    return pair_index[a[..., 0::2], a[..., 1::2]]


def twice(macros: Macros) -> imagination.Step:
    """Style "twice"'s step for `imagination.imagine` (with substeps=2): the primitive M stepped
    once per primitive of the macro, each with its own noise draw. The noise is then
    `imagine`'s for 2 * length steps with the same key, so n macro steps under given macros equal
    `imagine`'s 2n steps under the flattened primitives. In the trajectory pred is [L, 2, ...],
    z_next the latent after both primitives, and steps = {h, z, action, z_next} per primitive
    [L, 2, ...] is added (K's inputs)."""
    table = jnp.asarray(primitive_table(macros))

    def step(cell, carry, z, m, noise, tau):
        prims = table[m]
        first, second = (jax.tree.map(lambda x, i=i: x[i], noise) for i in range(2))
        mid_carry, z_mid, pred1 = imagination.dream_step(cell, carry, z, prims[0], first, tau)
        new_carry, z_next, pred2 = imagination.dream_step(cell, mid_carry, z_mid, prims[1], second, tau)
        steps = {"h": jnp.stack([transition.hidden(carry), transition.hidden(mid_carry)]), "z": jnp.stack([z, z_mid]),
                 "action": prims, "z_next": jnp.stack([z_mid, z_next])}
        pred = jax.tree.map(lambda x, y: jnp.stack([x, y]), pred1, pred2)
        return new_carry, z_next, pred, {"steps": steps}

    return step


def dream(
    cfg: Config, hp: dict[str, Any], key: jax.Array, m_params: Any, ctrl: jax.Array, start: jax.Array, horizon: int,
    style: str, macros: Macros,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """One imagined episode of `horizon` macro steps from latent `start` under the macro controller
    `ctrl` (pure; `cfg` as `style_config` makes it, static). Returns (trajectory, return):
    z [H, latent] (the latent each macro acted on), action (macro), reward (masked) and alive [H],
    p_done [H] (the macro's last primitive's for "twice").

    Ha's done rule per M step: for "twice" p_done > 0.5 after a macro's first primitive ends the
    dream there, so the second primitive earns nothing; the two primitives' rewards add up.
    """
    _check_config(cfg, style, macros)
    tcfg, ccfg = cfg.transition, cfg.controller
    tau = hp["evolve"]["tau"]

    def policy(carry, z):
        return controller.act(ccfg, ctrl, z, transition.hidden(carry))

    carry0 = transition.initial_carry(tcfg)
    if style == "twice":
        _, im = imagination.imagine(tcfg, m_params, key, carry0, start, horizon, tau, policy=policy,
                                    step=twice(macros), substeps=2)
        p_done = transition.p_done(im["pred"]).reshape(-1)  # [2H] in time order
        alive_step = transition.alive(transition.ends(p_done))
        reward = (im["pred"].reward.reshape(-1) * alive_step).reshape(horizon, 2).sum(-1)
        alive, p_done = alive_step[0::2], p_done[1::2]
    else:
        _, im = imagination.imagine(tcfg, m_params, key, carry0, start, horizon, tau, policy=policy)
        p_done = transition.p_done(im["pred"])
        alive = transition.alive(transition.ends(p_done))
        reward = im["pred"].reward * alive
    traj = {"z": im["z"], "action": im["action"], "reward": reward, "alive": alive, "p_done": p_done}
    return traj, jnp.sum(reward)


def scores(
    cfg: Config, hp: dict[str, Any], key: jax.Array, m_params: Any, population: jax.Array, mean: jax.Array,
    logvar: jax.Array, rollouts: int, horizon: int, style: str, macros: Macros,
) -> jax.Array:
    """Mean macro-dream return of each candidate over `rollouts` dreams: float[P] (pure).

    As `dream.scores`: start latents drawn from the stored posteriors (`dream.draw_starts`), and
    every candidate faces the same starts and noise (common random numbers); on one CPU device the
    candidates go in cache-sized blocks (`dream.cpu_block`)."""
    key_s, key_d = jax.random.split(key)
    starts = dream_lib.draw_starts(key_s, mean, logvar, rollouts)
    keys = jax.random.split(key_d, rollouts)

    def one(ctrl):
        run = jax.vmap(lambda k, s: dream(cfg, hp, k, m_params, ctrl, s, horizon, style, macros)[1])
        return jnp.mean(run(keys, starts))

    size = population.shape[0]
    block = dream_lib.cpu_block(size, rollouts * (2 if style == "twice" else 1))
    if block == size:
        return sharding.replicated(jax.vmap(one)(sharding.shard_leading(population)))
    blocks = population.reshape((size // block, block) + population.shape[1:])
    return jax.lax.map(jax.vmap(one), blocks).reshape(size)


def _episode(cfg: Config, params: dict[str, Any], key: jax.Array, macro_steps: int, style: str, macros: Macros
             ) -> dict[str, jax.Array]:
    env = PixelCartPole()
    env_params = env.default_params
    table = jnp.asarray(primitive_table(macros))
    tcfg = cfg.transition
    key_reset, key_run = jax.random.split(key)
    obs, state = env.reset(key_reset, env_params)

    def encode(o):
        mean, logvar = vae.encode(cfg.vae, params["vae"], o[None])
        return mean[0], logvar[0]

    def body(c, key_t):
        obs, state, carry, valid = c
        key_1, key_2 = jax.random.split(key_t)
        m, mean, logvar = rollout.agent_act(cfg, params, carry, obs)  # the agent's step: C picks a macro
        first, second = table[m, 0], table[m, 1]
        if style == "twice":
            carry, _ = transition.step(tcfg, params["transition"], carry, mean, first)
        else:  # macro-M: one step per macro, with the macro index
            carry, _ = transition.step(tcfg, params["transition"], carry, mean, m)
        obs, state, r1, term, trunc, _ = env.step(key_1, state, first, env_params)
        valid_2 = valid * (1.0 - jnp.logical_or(term, trunc).astype(jnp.float32))
        if style == "twice":  # the frame after the first move feeds M's second step
            carry, _ = transition.step(tcfg, params["transition"], carry, encode(obs)[0], second)
        obs, state, r2, term, trunc, _ = env.step(key_2, state, second, env_params)
        out = {"latent_mean": mean, "latent_logvar": logvar, "valid": valid, "macro": m,
               "reward": r1 * valid + r2 * valid_2, "steps": valid + valid_2}
        valid = valid_2 * (1.0 - jnp.logical_or(term, trunc).astype(jnp.float32))
        return (obs, state, carry, valid), out

    init = (obs, state, transition.initial_carry(tcfg), jnp.ones(()))
    _, out = jax.lax.scan(body, init, jax.random.split(key_run, macro_steps))
    steps = out.pop("steps")
    return {**out, "return": jnp.sum(out["reward"]), "length": jnp.sum(steps)}


def episodes(cfg: Config, params: dict[str, Any], key: jax.Array, num_episodes: int, macro_steps: int, style: str,
             macros: Macros) -> dict[str, jax.Array]:
    """`num_episodes` real episodes of a macro controller, at most `macro_steps` macros each
    (pure; vmapped and split over the devices, like rollout.episodes).

    params = {"vae", "transition" (the primitive M for "twice", macro-M for "macro_m"),
    "controller"}. Every macro step: V encodes the 4-frame stack (posterior mean z), C picks a macro
    from (z, h), its two moves run in PixelCartPole and the episode may end after either (later
    steps are masked). For "twice" M advances per move with the executed move and the encoded
    frame it was taken from; for "macro_m" macro-M advances once per macro with its index.
    Returns per episode return and length (in primitive steps), and per macro step [E, S]:
    latent_mean, latent_logvar [E, S, latent] (the posterior the macro was chosen on), valid (1
    while the episode runs), macro and reward (both moves', the second only if the first did not
    end the episode).
    """
    _check_config(cfg, style, macros)
    keys = sharding.shard_leading(jax.random.split(key, num_episodes))
    return sharding.replicated(jax.vmap(lambda k: _episode(cfg, params, k, macro_steps, style, macros))(keys))


@partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _episodes_jit(cfg, params, key, num_episodes, macro_steps, style, macros):
    return episodes(cfg, params, key, num_episodes, macro_steps, style, macros)


def run_episodes(cfg: Config, params: dict[str, Any], key: jax.Array, num_episodes: int, macro_steps: int,
                 style: str, macros: Macros = MACROS) -> dict[str, jax.Array]:
    """Jitted `episodes` (cfg static: `cfg.static()`)."""
    macros = validate(macros)
    _check_config(cfg, style, macros)
    params, key = sharding.put_replicated((params, key))
    return _episodes_jit(cfg.static(), params, key, num_episodes, macro_steps, style, macros)


@partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _dreams_jit(cfg, hp, key, m_params, ctrl, starts, horizon, style, macros):
    keys = jax.random.split(key, starts.shape[0])
    return jax.vmap(lambda k, s: dream(cfg, hp, k, m_params, ctrl, s, horizon, style, macros)[0])(keys, starts)


def dreams(cfg: Config, key: jax.Array, m_params: Any, ctrl: jax.Array, starts: jax.Array, horizon: int, style: str,
           macros: Macros = MACROS, hp: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """`dream` of one controller from each latent of `starts` [n, latent], jitted: its trajectories
    [n, horizon, ...] (hp default cfg.hyper(): tau)."""
    macros = validate(macros)
    _check_config(cfg, style, macros)
    return _dreams_jit(cfg.static(), cfg.hyper() if hp is None else hp, key, m_params, ctrl, starts, horizon, style,
                       macros)


@partial(jax.jit, static_argnums=(0, 7, 8, 9, 10))
def _score_jit(cfg, hp, key, m_params, population, mean, logvar, rollouts, horizon, style, macros):
    return scores(cfg, hp, key, m_params, population, mean, logvar, rollouts, horizon, style, macros)


def score_population(cfg: Config, key: jax.Array, m_params: Any, population: jax.Array, mean: jax.Array,
                     logvar: jax.Array, rollouts: int, horizon: int, style: str, macros: Macros = MACROS,
                     hp: dict[str, Any] | None = None) -> jax.Array:
    """Jitted `scores`: one call scores a generation of macro controllers."""
    macros = validate(macros)
    _check_config(cfg, style, macros)
    hp = cfg.hyper() if hp is None else hp
    args = sharding.put_replicated((hp, key, m_params, population, mean, logvar))
    return _score_jit(cfg.static(), *args, rollouts, horizon, style, macros)
