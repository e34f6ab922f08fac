"""Model-free PPO baselines on gymnax CartPole-v1, for experiments/sample_efficiency.py.

Not part of the library: the yardstick wm_jax's frugality is measured against. Two observations
of the same environment:
- "state": the 4-number physics state (x, x_dot, theta, theta_dot), an MLP actor and critic;
- "pixels": wm_jax's 64x64x4 uint8 frame stacks (`wm_jax.envs.cartpole.PixelCartPole`, the frames wm_jax
  learns from), a small CNN torso shared by the actor and the critic.

purejaxrl's structure: the training of every seed is one jitted program (seeds vmapped from the
state, mapped in turn from pixels; see `train`); an update
collects num_envs x num_steps transitions under `lax.scan`, computes GAE, and runs `epochs` passes of
clipped-objective minibatch updates (wm_jax.search.ppo's `gae` and `clipped_loss`, as PPO in the dream) (optax Adam, global-norm clipping, linear learning-rate decay).
Python only cuts the run into segments of `eval_every` env steps to record the learning curve: after
each, `eval_episodes` greedy episodes per seed, which are not training steps and are not counted
(as wm_jax's final 100 evaluation episodes are not). Every training step is counted: the env steps
of the rollouts the updates learn from.

    python experiments/ppo.py --obs state --seeds 0 1 2 --total-steps 150000
    python experiments/ppo.py --obs pixels --seeds 0 1 2 --total-steps 100000 --epochs 4 --minibatches 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from wm_jax.models import layers
from wm_jax.envs.cartpole import PixelCartPole
from wm_jax.search.ppo import clipped_loss, gae


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Defaults: rl-baselines3-zoo's tuned PPO for CartPole-v1 (8 envs x 32 steps, 20 epochs,
    gamma 0.98, GAE lambda 0.8, no entropy bonus, lr 1e-3 decaying to 0), which reaches 500 in about
    100k steps from the state."""

    obs: str = "state"  # "state" or "pixels"
    num_envs: int = 8
    num_steps: int = 32
    total_steps: int = 150_000
    epochs: int = 20
    minibatches: int = 1
    lr: float = 1e-3
    gamma: float = 0.98
    gae_lambda: float = 0.8
    clip_eps: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    eval_every: int = 10_240  # env steps between evaluations (rounded to whole updates)
    eval_episodes: int = 100
    max_steps: int = 500  # CartPole-v1's episode limit

    def __post_init__(self) -> None:
        if self.obs not in ("state", "pixels"):
            raise ValueError(f"PPOConfig.obs must be 'state' or 'pixels', got {self.obs!r}")
        for name in ("num_envs", "num_steps", "total_steps", "epochs", "minibatches", "eval_every", "eval_episodes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.batch % self.minibatches:
            raise ValueError(f"num_envs * num_steps = {self.batch} must be divisible by minibatches={self.minibatches}")

    @property
    def batch(self) -> int:  # env steps per update
        return self.num_envs * self.num_steps

    @property
    def updates(self) -> int:
        return self.total_steps // self.batch

    @property
    def updates_per_segment(self) -> int:
        return max(1, round(self.eval_every / self.batch))


def make_env(obs: str) -> tuple[Any, Any]:
    """(env, params) with the gymnax 1.x API: reset(key, params), step(...) -> six values, auto-reset."""
    if obs == "pixels":
        env = PixelCartPole()
        return env, env.default_params
    return gymnax.make("CartPole-v1")


class ActorCritic(nn.Module):
    pixels: bool

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.pixels:  # uint8 [..., 64, 64, 4] -> 31 -> 14 -> 6, then one shared dense layer
            x = obs.astype(jnp.float32) / 255.0
            for i, f in enumerate((16, 32, 32)):
                x = nn.relu(layers.Conv(f, 4, name=f"Conv_{i}")(x))
            x = nn.relu(nn.Dense(256)(x.reshape(*x.shape[:-3], -1)))
            actor = critic = x
        else:  # purejaxrl's two 64-unit tanh MLPs
            actor = critic = obs
            for _ in range(2):
                actor = nn.tanh(nn.Dense(64)(actor))
                critic = nn.tanh(nn.Dense(64)(critic))
        logits = nn.Dense(2, kernel_init=nn.initializers.orthogonal(0.01))(actor)
        value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))(critic)[..., 0]
        return logits, value


def segment_gae(reward: jax.Array, value: jax.Array, done: jax.Array, last_value: jax.Array, gamma: float,
                lam: float) -> tuple[jax.Array, jax.Array]:
    """wm_jax.search.ppo.gae on a rollout segment [T, envs]: step t's next value is step t + 1's (the
    value after the segment for the last), and every episode end is terminal (gymnax's
    CartPole-v1 reports its 500-step cut as done, as purejaxrl treats it)."""
    next_value = jnp.concatenate([value[1:], last_value[None]])
    return gae(reward, value, next_value, done, done, gamma, lam)


def make_train(pc: PPOConfig):
    """(init(key) -> runner, segment(runner, n) -> (runner, None), evaluate(runner, key) -> returns):
    pure functions of one seed, to be vmapped over seeds and jitted."""
    env, env_params = make_env(pc.obs)
    net = ActorCritic(pixels=pc.obs == "pixels")
    lr = optax.linear_schedule(pc.lr, 0.0, pc.updates * pc.epochs * pc.minibatches)
    tx = optax.chain(optax.clip_by_global_norm(pc.max_grad_norm), optax.adam(lr, eps=1e-5))
    reset = jax.vmap(env.reset, in_axes=(0, None))
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def init(key):
        k_net, k_env, k_run = jax.random.split(key, 3)
        obs, state = reset(jax.random.split(k_env, pc.num_envs), env_params)
        params = net.init(k_net, obs[:1])
        return {"params": params, "opt": tx.init(params), "env": state, "obs": obs, "key": k_run,
                "steps": jnp.zeros((), jnp.int32)}

    def loss_fn(params, mb):
        logits, value = net.apply(params, mb["obs"])
        return clipped_loss(logits, value, mb, pc.clip_eps, pc.vf_coef, pc.ent_coef)[0]

    def update(runner, _):
        def env_step(carry, _):
            state, obs, key = carry
            key, k_act, k_step = jax.random.split(key, 3)
            logits, value = net.apply(runner["params"], obs)
            action = jax.random.categorical(k_act, logits)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], -1)[..., 0]
            obs2, state, reward, terminated, truncated, _ = step(jax.random.split(k_step, pc.num_envs), state, action,
                                                                 env_params)
            done = jnp.logical_or(terminated, truncated).astype(jnp.float32)
            return (state, obs2, key), {"obs": obs, "action": action, "logp": logp, "value": value,
                                        "reward": reward, "done": done}

        (state, obs, key), traj = jax.lax.scan(env_step, (runner["env"], runner["obs"], runner["key"]), None,
                                               pc.num_steps)
        _, last_value = net.apply(runner["params"], obs)
        adv, ret = segment_gae(traj["reward"], traj["value"], traj["done"], last_value, pc.gamma, pc.gae_lambda)
        batch = {k: traj[k].reshape(pc.batch, *traj[k].shape[2:]) for k in ("obs", "action", "logp", "value")}
        batch["adv"], batch["ret"] = adv.reshape(-1), ret.reshape(-1)

        def epoch(carry, k):
            params, opt = carry
            perm = jax.random.permutation(k, pc.batch).reshape(pc.minibatches, -1)

            def minibatch(carry, idx):
                params, opt = carry
                grads = jax.grad(loss_fn)(params, jax.tree.map(lambda x: x[idx], batch))
                upd, opt = tx.update(grads, opt, params)
                return (optax.apply_updates(params, upd), opt), None

            return jax.lax.scan(minibatch, (params, opt), perm)[0], None

        key, k_epochs = jax.random.split(key)
        (params, opt), _ = jax.lax.scan(epoch, (runner["params"], runner["opt"]),
                                        jax.random.split(k_epochs, pc.epochs))
        runner = {"params": params, "opt": opt, "env": state, "obs": obs, "key": key,
                  "steps": runner["steps"] + pc.batch}
        return runner, None

    def segment(runner, n_updates):
        return jax.lax.scan(update, runner, None, n_updates)

    def evaluate(runner, key):
        """Mean return of eval_episodes greedy episodes (argmax of the actor) from fresh starts."""
        k_reset, k_steps = jax.random.split(key)
        obs, state = reset(jax.random.split(k_reset, pc.eval_episodes), env_params)

        def body(carry, k):
            state, obs, alive, ret = carry
            logits, _ = net.apply(runner["params"], obs)
            obs, state, reward, terminated, truncated, _ = step(jax.random.split(k, pc.eval_episodes), state,
                                                                jnp.argmax(logits, -1), env_params)
            ret = ret + reward * alive
            alive = alive * (1.0 - jnp.logical_or(terminated, truncated))
            return (state, obs, alive, ret), None

        ones = jnp.ones((pc.eval_episodes,), jnp.float32)
        (_, _, _, ret), _ = jax.lax.scan(body, (state, obs, ones, 0.0 * ones), jax.random.split(k_steps, pc.max_steps))
        return ret

    return init, segment, evaluate


def train(pc: PPOConfig, seeds: list[int], progress: bool = True) -> dict[str, Any]:
    """Train one PPO per seed, all seeds in one program; returns the learning curves:
    {"config", "seeds", "curve": [{"real_env_steps", "returns": [per seed mean over eval_episodes]}],
    "wall_s"} (wall time of the whole batch of seeds, evaluations included)."""
    init, segment, evaluate = make_train(pc)
    seg = pc.updates_per_segment
    # From the state, the seeds are vmapped. From pixels they are mapped one after another inside
    # the same program: vmapped, every seed's CNN has its own kernels, and XLA's CPU convolutions
    # with a batch of kernels ran far slower than the seeds in turn (no segment finished in 3 min).
    def batch(fn):
        if pc.obs == "state":
            return jax.vmap(fn)
        return lambda *xs: jax.lax.map(lambda args: fn(*args), xs)

    v_init = jax.jit(batch(init))
    v_segment = jax.jit(lambda r, n: batch(lambda x: segment(x, n))(r), static_argnums=1)
    v_eval = jax.jit(batch(evaluate))
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    eval_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    t0 = time.perf_counter()
    runner = v_init(keys)
    curve, done = [], 0
    bar = tqdm(total=pc.updates * pc.batch, desc=f"ppo {pc.obs}", unit="step", disable=not progress, leave=False)
    while done < pc.updates:
        n = min(seg, pc.updates - done)
        runner, _ = v_segment(runner, n)
        done += n
        ret = np.asarray(v_eval(runner, jax.vmap(jax.random.fold_in, in_axes=(0, None))(eval_keys, done)))
        curve.append({"real_env_steps": done * pc.batch, "returns": ret.mean(axis=1).tolist(),
                      "mins": ret.min(axis=1).tolist()})
        bar.update(n * pc.batch)
        bar.set_postfix(ret=" ".join(f"{r:.0f}" for r in ret.mean(axis=1)))
    bar.close()
    assert int(np.asarray(runner["steps"])[0]) == pc.updates * pc.batch  # every training step counted
    return {"config": dataclasses.asdict(pc), "seeds": list(seeds), "curve": curve, "wall_s": time.perf_counter() - t0}


def steps_to(curve: list[dict[str, Any]], seed_index: int, threshold: float) -> int | None:
    """Training env steps at the first evaluation whose mean return reaches threshold (None: never)."""
    for point in curve:
        if point["returns"][seed_index] >= threshold:
            return point["real_env_steps"]
    return None


def steps_to_stay(curve: list[dict[str, Any]], seed_index: int, threshold: float) -> int | None:
    """Training env steps at the evaluation from which every later one reaches threshold (None:
    the last one does not). PPO keeps learning and can fall back; a wm_jax agent is frozen."""
    since = None
    for point in curve:
        ok = point["returns"][seed_index] >= threshold
        since = (since or point["real_env_steps"]) if ok else None
    return since


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--obs", choices=("state", "pixels"), default="state")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--total-steps", type=int, default=PPOConfig.total_steps)
    p.add_argument("--epochs", type=int, default=PPOConfig.epochs)
    p.add_argument("--minibatches", type=int, default=PPOConfig.minibatches)
    p.add_argument("--out", default=None, help="write the curves as JSON here")
    a = p.parse_args()
    pc = PPOConfig(obs=a.obs, total_steps=a.total_steps, epochs=a.epochs, minibatches=a.minibatches)
    res = train(pc, a.seeds)
    for i, s in enumerate(a.seeds):
        print(f"seed {s}: steps to 475 {steps_to(res['curve'], i, 475.0)}, final {res['curve'][-1]['returns'][i]:.1f}")
    print(f"wall {res['wall_s']:.1f}s for {len(a.seeds)} seeds")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
