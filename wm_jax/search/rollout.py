"""The agent's act, and real episodes with the full agent (V + M + C) in the loop, vmapped over episodes.

Each episode is a fixed-length `lax.scan` of `max_steps` with a validity mask (gymnax
experimental/rollout.py): `ret += reward * valid; valid *= 1 - done`. The agent step is the one
`Agent.act` uses: encode the stack (posterior mean), act on [z, h], advance M with (z, a).
`agent_policy` is the same agent as a collection policy (later rounds' data), `collect_encoded`
fresh episodes encoded by V.
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import interrupt, sharding
from wm_jax.models import controller, imagination, transition, vae, verifier
from wm_jax.search import dream
from wm_jax.store import collection
from wm_jax.store import data as data_lib
from wm_jax import envs
from wm_jax.config import Config


def agent_act(
    cfg: Config, params: dict[str, Any], carry: Any, obs: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encode one uint8[64, 64, 4] obs and choose C's action on [z, h]: (action, z mean, z logvar).

    The controller acts on the posterior mean (a deterministic policy); dreams act on sampled z.
    """
    mean, logvar = vae.encode(cfg.vae, params["vae"], obs[None])
    mean, logvar = mean[0], logvar[0]
    return controller.act(cfg.controller, params["controller"], mean, transition.hidden(carry)), mean, logvar


def agent_step(
    cfg: Config, params: dict[str, Any], carry: Any, obs: jax.Array
) -> tuple[jax.Array, Any, dict[str, Any]]:
    """(carry, uint8[64, 64, 4] obs) -> (action, new carry, extras) for one observation.

    params = {"vae", "transition", "controller"}. M advances with (z, action); a caller that
    executes a different action must advance M with that one instead (see `agent_act`).
    extras carries z's posterior and M's prediction for the next latent (for the latent KL).
    """
    action, mean, logvar = agent_act(cfg, params, carry, obs)
    carry, pred = transition.step(cfg.transition, params["transition"], carry, mean, action)
    return action, carry, {"mean": mean, "logvar": logvar, "pred": pred}


def _episode(
    cfg: Config, params: dict[str, Any], key: jax.Array, max_steps: int, latents: bool = False
) -> dict[str, jax.Array]:
    env = envs.make(cfg.env)
    env_params = env.default_params
    key_reset, key_run = jax.random.split(key)
    obs, state = env.reset(key_reset, env_params)
    carry = transition.initial_carry(cfg.transition)

    def body(c, key_t):
        obs, state, carry, valid, prev_pred, has_prev = c
        key_step, key_kl = jax.random.split(key_t)
        action, carry, extra = agent_step(cfg, params, carry, obs)
        kl = transition.latent_kl_mc(key_kl, extra["mean"], extra["logvar"], prev_pred)
        obs, state, reward, terminated, truncated, _ = env.step(key_step, state, action, env_params)
        out = {"reward": reward * valid, "valid": valid, "kl": kl, "kl_mask": valid * has_prev}
        if latents:
            out.update(latent_mean=extra["mean"], latent_logvar=extra["logvar"])
        valid = valid * (1.0 - jnp.logical_or(terminated, truncated).astype(jnp.float32))
        return (obs, state, carry, valid, extra["pred"], jnp.ones(())), out

    # A placeholder prediction for step 0 (masked out of the KL): M's prediction from a zero carry.
    _, zero_pred = transition.step(
        cfg.transition, params["transition"], carry, jnp.zeros((cfg.vae.latent,)), transition.null_action(cfg.transition)
    )
    init = (obs, state, carry, jnp.ones(()), zero_pred, jnp.zeros(()))
    _, out = jax.lax.scan(body, init, jax.random.split(key_run, max_steps))
    res = {
        "return": jnp.sum(out["reward"]),
        "length": jnp.sum(out["valid"]),
        "kl_sum": jnp.sum(out["kl"] * out["kl_mask"]),
        "kl_count": jnp.sum(out["kl_mask"]),
    }
    if latents:
        res.update(latent_mean=out["latent_mean"], latent_logvar=out["latent_logvar"], latent_valid=out["valid"])
    return res


def episodes(
    cfg: Config, params: dict[str, Any], key: jax.Array, num_episodes: int, max_steps: int, latents: bool = False
) -> dict[str, jax.Array]:
    """`num_episodes` real episodes vmapped and split over the devices: pure and traceable (the
    controller search runs its real checks with it inside its own jitted program)."""
    keys = sharding.shard_leading(jax.random.split(key, num_episodes))
    return sharding.replicated(jax.vmap(lambda k: _episode(cfg, params, k, max_steps, latents))(keys))


_run_episodes = jax.jit(episodes, static_argnums=(0, 3, 4, 5))


def run_episodes(
    cfg: Config, params: dict[str, Any], key: jax.Array, num_episodes: int, max_steps: int = 500,
    latents: bool = False,
) -> dict[str, jax.Array]:
    """`num_episodes` real episodes, vmapped and split over the devices (wm_jax.sharding);
    per-episode return, length and summed latent KL. With `latents`, also the encoder posterior
    of every step (latent_mean, latent_logvar [E, max_steps, latent]) and its validity
    (latent_valid [E, max_steps]: 1 up to and including the episode's last step)."""
    params, key = sharding.put_replicated((params, key))
    return _run_episodes(cfg.static(), params, key, num_episodes, max_steps, latents)


def evaluate(
    cfg: Config, params: dict[str, Any], key: jax.Array, num_episodes: int | None = None, max_steps: int | None = None,
    batch: int = 50, latents: bool = False,
) -> dict[str, Any]:
    """Real-environment metrics: mean/std/min return, episodes, env steps, one-step latent KL, and
    `cut`, how many episodes max_steps stopped before the task's step limit.

    With `latents`, also "latents": {"mean", "logvar" [episodes * max_steps, latent], "valid"
    [episodes * max_steps]}, the posteriors of the states the agent visited (see run_episodes;
    the controller search's own checks call `episodes` inside its jit)."""
    num = cfg.eval.episodes if num_episodes is None else num_episodes
    steps = cfg.eval.max_steps if max_steps is None else max_steps
    batch = min(batch, num)
    parts = []
    for i in range(-(-num // batch)):
        interrupt.check()  # Ctrl-C between batches of episodes
        parts.append(jax.device_get(run_episodes(cfg, params, jax.random.fold_in(key, i), batch, steps, latents)))
    res = {k: np.concatenate([p[k] for p in parts])[:num] for k in parts[0]}
    returns = res["return"].astype(np.float64)
    extra = {}
    if latents:
        extra["latents"] = {
            "mean": res["latent_mean"].reshape(num * steps, -1),
            "logvar": res["latent_logvar"].reshape(num * steps, -1),
            "valid": res["latent_valid"].reshape(num * steps),
        }
    # Episodes stopped by max_steps before the task's own step limit: their returns are not whole
    # episodes' (on a task paying -1 per step, better than any whole one), so no threshold judges them.
    cut = int(np.sum(res["length"] >= steps)) if steps < envs.spec(cfg.env).max_steps else 0
    return {
        **extra,
        "cut": cut,
        "returns": returns.tolist(),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "episodes": int(num),
        "env_steps": int(res["length"].sum()),
        "latent_kl": float(res["kl_sum"].sum() / max(res["kl_count"].sum(), 1.0)),
    }


def open_loop(cfg: Config, params: dict[str, Any], key: jax.Array, steps: int) -> dict[str, np.ndarray]:
    """A real episode of the agent (at most `steps` steps) beside what V and M make of it: the
    data of the run's episode strip and of `wm-jax video`.

    Per step t (arrays [steps, ...]; `valid` is 1 up to and including the episode's last step):
    real (the newest frame of the obs the agent acted on, uint8[64, 64]), action, reward (real),
    recon (V's reconstruction from the posterior mean, [0, 1]), dreamed (M open loop from the
    first latent along the real actions, decoded), dream_reward and dream_p_done (M's heads at
    the dream's step t), dream_confidence (K's p(real) for the dream's transition t, with
    params["verifier"]), pixel_error (mean |dreamed - recon|) and z (V's posterior means).
    """
    return jax.device_get(_open_loop(cfg.static(), cfg.hyper()["evolve"]["tau"], params, key, steps))


@partial(jax.jit, static_argnums=(0, 4))
def _open_loop(cfg: Config, tau: jax.Array, params: dict[str, Any], key: jax.Array, steps: int) -> dict[str, Any]:
    env = envs.make(cfg.env)
    k_reset, k_run, k_dream = jax.random.split(key, 3)
    obs, state = env.reset(k_reset)

    def body(c, t):
        obs, state, carry, valid = c
        action, carry, extra = agent_step(cfg, params, carry, obs)
        obs_next, state, reward, terminated, truncated, _ = env.step(jax.random.fold_in(k_run, t), state, action)
        out = (obs[..., -1], extra["mean"], action, reward * valid, valid)
        valid = valid * (1.0 - jnp.logical_or(terminated, truncated).astype(jnp.float32))
        return (obs_next, state, carry, valid), out

    init = (obs, state, transition.initial_carry(cfg.transition), jnp.ones(()))
    _, (real, zs, actions, reward, valid) = jax.lax.scan(body, init, jnp.arange(steps))
    recon = vae.decode(cfg.vae, params["vae"], zs)[..., -1]
    _, im = imagination.imagine(cfg.transition, params["transition"], k_dream, transition.initial_carry(cfg.transition),
                               zs[0], steps, tau, actions=actions)
    dreamed = vae.decode(cfg.vae, params["vae"], im["z"])[..., -1]
    out = {"z": zs, "real": real, "action": actions, "reward": reward, "valid": valid, "recon": recon, "dreamed": dreamed,
           "dream_reward": im["pred"].reward, "dream_p_done": transition.p_done(im["pred"]),
           "pixel_error": jnp.mean(jnp.abs(dreamed - recon), axis=(-2, -1))}
    if params.get("verifier") is not None:
        out["dream_confidence"] = verifier.confidence(cfg.verifier, params["verifier"], im["h"], im["z"],
                                                      im["action"], im["z_next"])
    return out


def imagined_rollouts(cfg: Config, params: dict[str, Any], key: jax.Array, starts: jax.Array) -> dict[str, np.ndarray]:
    """`dream.dream` of the agent's controller from each latent of `starts` [n, latent] (the run's
    imagined_rollouts.npz): a dict of [n, horizon, ...] arrays; with params["verifier"], K's
    confidence too."""
    k_params = params.get("verifier")
    if k_params is None:  # without K the rollouts are plain dreams
        cfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, mode="off"))
    trajs = [dream.dream(cfg, k, params["transition"], params["controller"], z, cfg.evolve.horizon, k_params)[0]
             for k, z in zip(jax.random.split(key, len(starts)), starts)]
    return {k: np.stack([np.asarray(tr[k]) for tr in trajs]) for k in trajs[0]}


@functools.lru_cache(maxsize=8)
def agent_policy(cfg: Config) -> collection.Policy:
    """The trained agent as a collection policy, with epsilon-random actions for coverage; its
    parameters ({"vae", "transition", "controller"}) are collect's `params`. One Policy per config,
    so every round's collection runs the same compiled program."""
    eps, space = cfg.rounds.action_noise, envs.spec(cfg.env).action_space

    def act(params, key, carry, obs):
        action, z, _ = agent_act(cfg, params, carry, obs)
        k1, k2 = jax.random.split(key)
        rand = collection.random_action(space, k1)
        action = jnp.where(jax.random.uniform(k2) < eps, rand, action)
        carry, _ = transition.step(cfg.transition, params["transition"], carry, z, action)  # the executed action
        return action, carry

    return collection.Policy(act=act, init_carry=lambda: transition.initial_carry(cfg.transition), uses_pixels=True)


def collect_encoded(cfg: Config, params: dict[str, Any], policy: str, episodes: int, seed: int) -> dict[str, Any]:
    """Fresh episodes (never trained on) of the random policy or of the agent in `params` (with
    rounds.action_noise), encoded by V: per-row arrays as transition.training_arrays."""
    kwargs = {"policy": agent_policy(cfg), "params": params} if policy == "agent" else {}
    ds = collection.collect(jax.random.key(seed), episodes, max_steps=cfg.eval.max_steps,
                            chunk_size=episodes, progress=False, env=cfg.env, **kwargs)
    cols = data_lib.to_arrays(ds)
    index = data_lib.EpisodeIndex.from_columns(cols["episode"], cols["t"])
    mean, logvar = vae.encode_all(cfg.vae, params["vae"], cols["frame"], index.stack_rows)
    return transition.training_arrays(mean, logvar, cols, index)
