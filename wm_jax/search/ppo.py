"""PPO in the dream: the second way to search C (evolve.trainer = "ppo"), beside CMA-ES.

- `DreamEnv`: a gymnax-style functional environment over M (step returns six values, terminated
  and truncated apart, as wm_jax.envs.cartpole.PixelCartPole). reset draws a start latent as the
  CMA-ES dreams do (a stored encoder posterior, or with the grounding share a state the latest
  real check reached) with M's carry at zero; step is one step of `imagination.imagine` and the dream's
  `dream.outcome` (reward head, Ha's done rule, the verifier's weight or cutoff); observation =
  [z, h]; an episode ends at the done head or after evolve.horizon steps (truncated), and the
  env resets itself. Any JAX RL loop can train in it, vmapped over thousands of dreams.
- `gae` and `clipped_loss`: purejaxrl's advantage estimate and PPO objective (truncations
  bootstrap from the value of the state they cut off); `sample_action` and `log_prob_entropy`:
  the stochastic policy, categorical on a discrete task, a Gaussian squashed into the bounds on a
  continuous one.
- `init` / `period`: the controller search's state machine, the same interface as wm_jax.search.evolve's
  CMA-ES (`TRAINER`, a checks.Trainer), so `driver.search` drives either (checkpoints, resume, logs, progress bar, stop_at,
  sweeps). A generation is ppo.updates updates (collect envs x steps imagined steps under the
  stochastic policy, GAE, epochs of minibatch updates, all one `lax.scan`); after every
  check_every generations the greedy policy (as C acts everywhere: the argmax, or the squashed
  mean on a continuous task) is scored in the dream
  and checked in the real environment exactly as the CMA-ES mean is, and the best checked policy
  is kept.
The actor is the controller itself (cfg.controller: its flat vector, `controller.logits`), so an
agent trained with PPO is stored, loaded and evaluated as any other; the critic is a two-layer
tanh MLP on [z, h] that lives only in the search state, as do a continuous policy's log standard
deviations (one per action dimension, learned, state-independent as purejaxrl's).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from wm_jax import stats
from wm_jax.models import controller, imagination, train, transition
from wm_jax.search import checks, dream
from wm_jax.config import Config


@struct.dataclass
class DreamParams:
    """What the dream env steps with: M's packed cell, K's parameters, the start distributions and
    the traced hyperparameters (tau, the verifier's threshold, the grounding share)."""

    cell: transition.Cell
    k_params: Any
    starts: tuple[jax.Array, jax.Array]  # stored encoder posteriors (mean, logvar) [N, latent]
    pool: dream.Pool  # real states of the latest check (mean, logvar, valid) [R, ...]
    pool_cdf: jax.Array  # cumsum of the pool's valid flags [R]: a uniform draw over valid rows is one search
    hp: dict[str, Any]
    rows: Any = None  # how many rows of starts exist (the rows after them pad; None: all)


@struct.dataclass
class DreamState:
    carry: tuple[jax.Array, jax.Array]  # M's LSTM state
    z: jax.Array  # [latent]: the latent the next action acts on
    t: jax.Array  # int32: steps taken in this episode
    ret: jax.Array  # float32: reward collected in this episode


class DreamEnv:
    """M as an environment (gymnax-style functional API, one dream; vmap for a batch).

    reset(key, params) -> (obs, state); step(key, state, action, params) -> (obs, state, reward,
    terminated, truncated, info), resetting by itself when the episode ends; info holds
    final_obs (the observation the step reached, before any reset), episode_return (the ended
    episode's return, where it ended), p_done and, with a verifier, confidence.
    """

    def __init__(self, cfg: Config, horizon: int | None = None) -> None:
        self.cfg = cfg
        self.horizon = cfg.evolve.horizon if horizon is None else horizon

    def params(self, m_params: Any, starts: tuple[jax.Array, jax.Array], pool: dream.Pool | None = None,
               k_params: Any = None, hp: dict[str, Any] | None = None, rows: Any = None) -> DreamParams:
        if self.cfg.verifier.mode != "off" and k_params is None:
            raise ValueError(f"verifier.mode={self.cfg.verifier.mode!r} needs the verifier's parameters (k_params)")
        cell = transition.pack(self.cfg.transition, m_params)
        m_latent = cell.w.shape[0] - self.cfg.transition.hidden
        if starts[0].shape[-1] != m_latent or starts[1].shape != starts[0].shape:
            raise ValueError(f"starts must be (mean, logvar) of shape [N, {m_latent}] (M's latent size), got "
                             f"{tuple(starts[0].shape)} and {tuple(starts[1].shape)}")
        if pool is None:  # nothing grounded: one invalid row
            pool = (starts[0][:1], starts[1][:1], jnp.zeros((1,), jnp.float32))
        return DreamParams(cell=cell, k_params=k_params, starts=starts,
                           pool=pool, pool_cdf=jnp.cumsum(pool[2] > 0), hp=self.cfg.hyper() if hp is None else hp,
                           rows=rows)

    def observation_size(self, latent: int) -> int:
        return latent + self.cfg.transition.hidden

    @staticmethod
    def obs(state: DreamState) -> jax.Array:
        return jnp.concatenate([state.z, transition.hidden(state.carry)], axis=-1)

    def reset(self, key: jax.Array, params: DreamParams) -> tuple[jax.Array, DreamState]:
        """A start latent: from the pool with probability hp.evolve.grounding (when it has a valid
        row), else from a random stored posterior; each sampled once."""
        key_r, key_p, key_g, key_z = jax.random.split(key, 4)
        mean, logvar = params.starts
        row = jax.random.randint(key_r, (), 0, mean.shape[0] if params.rows is None else params.rows)
        p_mean, p_logvar, _ = params.pool
        valid = params.pool_cdf[-1]
        # a uniform valid row: the first whose count of valid rows up to it exceeds u in [0, valid)
        prow = jnp.searchsorted(params.pool_cdf, jax.random.randint(key_p, (), 0, jnp.maximum(valid, 1)), side="right")
        prow = jnp.minimum(prow, p_mean.shape[0] - 1)
        use = (jax.random.uniform(key_g) < params.hp["evolve"]["grounding"]) & (valid > 0)
        z = stats.gaussian_sample(key_z, jnp.where(use, p_mean[prow], mean[row]),
                                  jnp.where(use, p_logvar[prow], logvar[row]))
        state = DreamState(carry=transition.initial_carry(self.cfg.transition), z=z,
                           t=jnp.zeros((), jnp.int32), ret=jnp.zeros((), jnp.float32))
        return self.obs(state), state

    def step(self, key: jax.Array, state: DreamState, action: jax.Array, params: DreamParams
             ) -> tuple[jax.Array, DreamState, jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
        key_step, key_reset = jax.random.split(key)
        action = jnp.asarray(action, jnp.float32 if self.cfg.transition.continuous else jnp.int32)
        carry, im = imagination.imagine(self.cfg.transition, params.cell, key_step, state.carry, state.z, 1,
                                        params.hp["evolve"]["tau"], actions=action[None])
        im = jax.tree.map(lambda x: x[0], im)  # the one step
        z_next = im["z_next"]
        out = dream.outcome(self.cfg, params.hp, params.k_params, im["h"], state.z, action, z_next, im["pred"])
        reward = out["reward"] * out["verified"]
        terminated = jnp.maximum(out["ends"], 1.0 - out["verified"]) > 0
        t = state.t + 1
        truncated = (t >= self.horizon) & ~terminated
        stepped = DreamState(carry=carry, z=z_next, t=t, ret=state.ret + reward)
        done = terminated | truncated
        _, fresh = self.reset(key_reset, params)
        new = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, stepped)
        info = {"final_obs": self.obs(stepped), "episode_return": stepped.ret, "p_done": out["p_done"]}
        if "confidence" in out:
            info["confidence"] = out["confidence"]
        return self.obs(new), new, reward, terminated, truncated, info


def gae(reward: jax.Array, value: jax.Array, next_value: jax.Array, terminal: jax.Array, done: jax.Array,
        gamma: jax.Array | float, lam: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimates over time (axis 0): (advantages, returns = advantages + values).

    next_value[t] is V of the state step t reached (before any reset); terminal[t] (the episode
    ended with no future: no bootstrap) and done[t] (ended, terminal or truncated: the advantage
    does not flow back across it) are 0/1. A truncated step bootstraps from next_value."""
    terminal, done = (jnp.asarray(x, value.dtype) for x in (terminal, done))
    delta = reward + gamma * (1.0 - terminal) * next_value - value

    def back(adv_next, x):
        d, end = x
        adv = d + gamma * lam * (1.0 - end) * adv_next
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros_like(value[0]), (delta, done), reverse=True)
    return adv, adv + value


def log_prob_entropy(out: jax.Array, action: jax.Array, log_std: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """(log pi(action), the policy's entropy) per row: a categorical over the scores `out`, or with
    `log_std` ([actions]) a diagonal Gaussian of mean `out` over the pre-squash action vector."""
    if log_std is None:
        logp_all = jax.nn.log_softmax(out)
        logp = jnp.take_along_axis(logp_all, action[..., None], -1)[..., 0]
        return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    std = jnp.exp(log_std)
    logp = jnp.sum(-0.5 * jnp.square((action - out) / std) - log_std - 0.5 * math.log(2.0 * math.pi), -1)
    entropy = jnp.broadcast_to(jnp.sum(log_std + 0.5 * math.log(2.0 * math.pi * math.e)), logp.shape)
    return logp, entropy


def sample_action(ccfg: Any, key: jax.Array, out: jax.Array, log_std: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One draw of the stochastic policy: (the action the dream steps with, the action PPO learns
    on, its log-probability). Discrete: an action index drawn from the scores (both the same).
    Continuous (`log_std`): u ~ N(out, exp(log_std)), learned on as it is, stepped with as
    `controller.squash(u)`, so the greedy policy (u = out) is the controller's own action."""
    if log_std is None:
        action = jax.random.categorical(key, out).astype(jnp.int32)
        return action, action, log_prob_entropy(out, action)[0]
    u = out + jnp.exp(log_std) * jax.random.normal(key, out.shape, out.dtype)
    return controller.squash(ccfg, u), u, log_prob_entropy(out, u, log_std)[0]


def clipped_loss(logits: jax.Array, value: jax.Array, batch: dict[str, jax.Array], clip: Any, vf_coef: Any,
                 ent_coef: Any, log_std: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's objective on a minibatch (purejaxrl): the clipped surrogate on advantages normalized
    in the minibatch, the clipped value loss and the entropy bonus. batch: action, logp and value
    (at collection), adv, ret; `logits` the policy's scores (with `log_std`: its Gaussian's mean)."""
    logp, entropy = log_prob_entropy(logits, batch["action"], log_std)
    ratio = jnp.exp(logp - batch["logp"])
    adv = (batch["adv"] - batch["adv"].mean()) / (batch["adv"].std() + 1e-8)
    actor = -jnp.mean(jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * adv))
    v_clipped = batch["value"] + jnp.clip(value - batch["value"], -clip, clip)
    critic = 0.5 * jnp.mean(jnp.maximum(jnp.square(value - batch["ret"]), jnp.square(v_clipped - batch["ret"])))
    entropy = jnp.mean(entropy)
    total = actor + vf_coef * critic - ent_coef * entropy
    return total, {"actor_loss": actor, "value_loss": critic, "entropy": entropy}


def _orthogonal(key: jax.Array, shape: tuple[int, int], scale: float) -> jax.Array:
    return jax.nn.initializers.orthogonal(scale)(key, shape, jnp.float32)


def init_actor(cfg: Config, key: jax.Array, latent: int) -> jax.Array:
    """The controller's flat vector initialised for PPO (purejaxrl): orthogonal hidden weights with
    gain sqrt(2), an output layer with gain 0.01 (near-uniform first policy), zero biases."""
    ccfg, inputs = cfg.controller, latent + cfg.transition.hidden
    n = ccfg.actions
    k1, k2 = jax.random.split(key)
    if ccfg.kind == "linear":
        parts = [_orthogonal(k1, (inputs, n), 0.01), jnp.zeros((n,))]
    else:
        parts = [_orthogonal(k1, (inputs, ccfg.mlp_hidden), math.sqrt(2.0)), jnp.zeros((ccfg.mlp_hidden,)),
                 _orthogonal(k2, (ccfg.mlp_hidden, n), 0.01), jnp.zeros((n,))]
    flat = jnp.concatenate([p.reshape(-1) for p in parts]).astype(jnp.float32)
    assert flat.shape[0] == controller.num_params(ccfg, latent, cfg.transition.hidden)
    return flat


def init_critic(cfg: Config, key: jax.Array, latent: int) -> dict[str, jax.Array]:
    inputs, width = latent + cfg.transition.hidden, cfg.ppo.critic_hidden
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": _orthogonal(k1, (inputs, width), math.sqrt(2.0)), "b1": jnp.zeros((width,)),
            "w2": _orthogonal(k2, (width, width), math.sqrt(2.0)), "b2": jnp.zeros((width,)),
            "w3": _orthogonal(k3, (width, 1), 1.0), "b3": jnp.zeros((1,))}


def value(critic: dict[str, jax.Array], obs: jax.Array) -> jax.Array:
    x = jnp.tanh(obs @ critic["w1"] + critic["b1"])
    x = jnp.tanh(x @ critic["w2"] + critic["b2"])
    return (x @ critic["w3"] + critic["b3"])[..., 0]


def _optimizer(hp: dict[str, Any]) -> optax.GradientTransformation:
    return train.optimizer({"lr": hp["ppo"]["lr"], "clip_norm": hp["ppo"]["max_grad_norm"]})


@struct.dataclass
class PPOState:
    """The search state (with the fields driver.search reads, as EvolveState has them)."""

    actor: jax.Array  # the controller's flat vector: the current policy's logits
    critic: dict[str, jax.Array]
    opt: Any  # optax state of (actor, critic)
    env: DreamState  # the dreams in flight [envs]
    pool: dream.Pool  # real states the latest check reached (grounded resets)
    best: jax.Array  # the checked actor with the best real return so far
    best_real: jax.Array
    generation: jax.Array  # int32: generations done (ppo.updates updates each)
    real_env_steps: jax.Array  # int32: env steps spent in real checks
    # a continuous task's policy: the Gaussian's log standard deviations [actions] (pre-squash);
    # None on a discrete task, whose policy is the controller's scores alone
    log_std: Any = None


def _trainable(state: PPOState) -> tuple:
    """What the optimizer updates: (actor, critic), and log_std on a continuous task."""
    return (state.actor, state.critic) if state.log_std is None else (state.actor, state.critic, state.log_std)


# the pre-squash policy's log standard deviation at the start (purejaxrl's continuous actor: 0)
INIT_LOG_STD = 0.0


# a period's per-generation metrics (generations.jsonl): the dream returns as CMA-ES logs them, and
# the policy's entropy and the critic's loss, averaged over the generation's minibatch steps
GENERATION_METRICS = ("dream_mean", "dream_max", "entropy", "value_loss")


def imagined_steps_per_generation(cfg: Config) -> int:
    return cfg.ppo.updates * cfg.ppo.envs * cfg.ppo.steps


def init(cfg: Config, hp: dict[str, Any], key: jax.Array, world: Any, init_mean: jax.Array | None = None
         ) -> PPOState:
    """PPO's start: the actor from init_mean (a previous round's controller) or freshly
    initialised, a fresh critic, ppo.envs dreams reset, and the pool as evolve.init draws it."""
    latent = world.starts[0].shape[-1]
    # key_init's branch only: the other half of split(key) is the search's (period's key_run)
    key_init, _ = jax.random.split(key)
    k_actor, k_critic, k_env = jax.random.split(jax.random.fold_in(key_init, 2), 3)
    actor = init_actor(cfg, k_actor, latent) if init_mean is None else jnp.asarray(init_mean, jnp.float32)
    critic = init_critic(cfg, k_critic, latent)
    log_std = jnp.full((cfg.controller.actions,), INIT_LOG_STD, jnp.float32) if cfg.controller.continuous else None
    rows = jax.random.randint(jax.random.fold_in(key_init, 1), (cfg.evolve.check_episodes * cfg.eval.max_steps,), 0,
                              world.starts[0].shape[0] if world.rows is None else world.rows)
    pool = (world.starts[0][rows], world.starts[1][rows], jnp.ones(rows.shape, jnp.float32))
    env = DreamEnv(cfg)
    params = env.params(world.m_params, world.starts, pool, world.k_params, hp, world.rows)
    _, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, cfg.ppo.envs), params)
    state = PPOState(actor=actor, critic=critic, opt=None, env=env_state, pool=pool, best=actor,
                     best_real=jnp.asarray(-jnp.inf, jnp.float32), generation=jnp.zeros((), jnp.int32),
                     real_env_steps=jnp.zeros((), jnp.int32), log_std=log_std)
    return state.replace(opt=_optimizer(hp).init(_trainable(state)))


def _update(cfg: Config, hp: dict[str, Any], env: DreamEnv, params: DreamParams, state: PPOState, key: jax.Array
            ) -> tuple[PPOState, dict[str, jax.Array]]:
    """One PPO update: ppo.steps imagined steps in each of ppo.envs dreams, then ppo.epochs epochs
    of ppo.minibatches minibatch steps."""
    pc, ccfg, ph = cfg.ppo, cfg.controller, hp["ppo"]
    latent = state.env.z.shape[-1]
    tx = _optimizer(hp)

    def policy(actor, obs):
        return controller.logits(ccfg, actor, obs[..., :latent], obs[..., latent:])

    def env_step(env_state, k):
        k_act, k_step = jax.random.split(k)
        obs = jax.vmap(env.obs)(env_state)
        step_action, action, logp = sample_action(ccfg, k_act, policy(state.actor, obs), state.log_std)
        _, env_state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_step, pc.envs), env_state, step_action, params)
        return env_state, {"obs": obs, "action": action, "logp": logp, "value": value(state.critic, obs),
                           "next_value": value(state.critic, info["final_obs"]), "reward": reward,
                           "terminal": terminated, "done": terminated | truncated,
                           "episode_return": info["episode_return"]}

    key_roll, key_epochs = jax.random.split(key)
    env_state, traj = jax.lax.scan(env_step, state.env, jax.random.split(key_roll, pc.steps))
    adv, ret = gae(traj["reward"], traj["value"], traj["next_value"], traj["terminal"], traj["done"], ph["gamma"],
                   ph["gae_lambda"])
    size = pc.envs * pc.steps
    batch = {k: traj[k].reshape((size,) + traj[k].shape[2:]) for k in ("obs", "action", "logp", "value")}
    batch["adv"], batch["ret"] = adv.reshape(size), ret.reshape(size)

    def loss(params_ac, mb):
        actor, critic, *log_std = params_ac
        return clipped_loss(policy(actor, mb["obs"]), value(critic, mb["obs"]), mb, ph["clip"], ph["vf_coef"],
                            ph["ent_coef"], *log_std)

    def epoch(carry, k):
        def minibatch(carry, idx):
            params_ac, opt = carry
            (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params_ac, jax.tree.map(lambda x: x[idx], batch))
            upd, opt = tx.update(grads, opt, params_ac)
            return (optax.apply_updates(params_ac, upd), opt), aux

        return jax.lax.scan(minibatch, carry, jax.random.permutation(k, size).reshape(pc.minibatches, -1))

    (trained, opt), aux = jax.lax.scan(epoch, (_trainable(state), state.opt), jax.random.split(key_epochs, pc.epochs))
    actor, critic, *log_std = trained
    done = traj["done"].astype(jnp.float32)
    metrics = {"episodes": jnp.sum(done), "return_sum": jnp.sum(done * traj["episode_return"]),
               "return_max": jnp.max(jnp.where(done > 0, traj["episode_return"], -jnp.inf)),
               "running_mean": jnp.mean(env_state.ret), **jax.tree.map(jnp.mean, aux)}
    return state.replace(actor=actor, critic=critic, opt=opt, env=env_state, log_std=log_std[0] if log_std else None
                         ), metrics


def period(cfg: Config, hp: dict[str, Any], world: Any, state: PPOState, key: jax.Array, gens: int,
           score: Any, check: Any, batched: bool = False) -> tuple[PPOState, dict[str, jax.Array]]:
    """`gens` generations of PPO updates, then the check of the greedy policy, the pool refresh and
    the best update, as evolve.period does for the CMA-ES mean (same metrics: dream_mean and
    dream_max per generation are the mean and best return of the dream episodes that ended in
    it; if none ended, both are the mean return so far of the dreams in flight). With `batched`, every cell's search is vmapped (PPO has no per-cell sequential part).

    Update u of the search draws fold_in(key_updates, u), so the result does not depend on how the
    search is cut into calls."""
    if batched:  # every cell at once, each in its own world when the world has cells (a batch of seeds)
        return jax.vmap(lambda w, h, s, k: period(cfg, h, w, s, k, gens, score, check),
                        in_axes=(world.axis(), 0, 0, 0))(world, hp, state, key)
    pc = cfg.ppo
    key_run = jax.random.split(key)[1]
    # the updates' own branch: fold_in(key_run, 10_000_000 + g) are the checks' keys
    key_updates = jax.random.fold_in(key_run, 2**31 - 1)
    env = DreamEnv(cfg)
    params = env.params(world.m_params, world.starts, state.pool, world.k_params, hp, world.rows)

    def generation(st, g):
        def one(st, u):
            return _update(cfg, hp, env, params, st, jax.random.fold_in(key_updates, u))

        st, m = jax.lax.scan(one, st, g * pc.updates + jnp.arange(pc.updates))
        episodes = jnp.sum(m["episodes"])
        mean = jnp.where(episodes > 0, jnp.sum(m["return_sum"]) / jnp.maximum(episodes, 1.0), m["running_mean"][-1])
        best = jnp.where(episodes > 0, jnp.max(m["return_max"]), mean)
        return st, {"dream_mean": mean, "dream_max": best, "entropy": jnp.mean(m["entropy"]),
                    "value_loss": jnp.mean(m["value_loss"])}

    state, history = jax.lax.scan(generation, state, state.generation + jnp.arange(gens))
    done = state.generation + gens
    dream_return, real = checks.check_candidate(cfg, hp, world, state.pool, key_run, done, state.actor, score, check)
    better = real["return_mean"] > state.best_real
    new = state.replace(
        pool=real["latents"],
        best=jnp.where(better, state.actor, state.best),
        best_real=jnp.where(better, real["return_mean"], state.best_real),
        generation=done,
        real_env_steps=state.real_env_steps + real["env_steps"],
    )
    metrics = {**history, "generation": done, "dream_return": dream_return, **checks.check_metrics(real)}
    return new, metrics


TRAINER = checks.Trainer(init=init, period=period, generation_metrics=GENERATION_METRICS,
                         imagined_steps_per_generation=imagined_steps_per_generation)
