"""The presets: named configurations, and the helpers that derive one config from another.

    cfg = get_preset("frugal", seed=1)          # the main job's configuration
    cfg = with_compute_dtype(cfg, "bfloat16")   # V and M computing in bfloat16
    cfg = with_trainer(cfg, "ppo")              # C searched with PPO instead of CMA-ES
    cfg = with_env(cfg, "Acrobot-v1")           # the same recipe on another task of wm_jax.envs

README's preset table lists every preset's sizes and its deviations from the recipe.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from wm_jax import envs
from wm_jax.config import TRAINERS, Config, ConfigError, ControllerConfig, DataConfig, EvalConfig, EvolveConfig
from wm_jax.config import RoundsConfig, TrainConfig, TransitionConfig, VAEConfig


def _paper() -> Config:
    return Config(preset="paper")


def _cpu() -> Config:
    # Sized for a 2-core CPU (README's preset table lists every deviation from the recipe).
    return Config(
        preset="cpu",
        data=DataConfig(episodes=1000),
        vae=VAEConfig(
            filters=(8, 16, 32, 64),
            kl_ramp_steps=1000,
            free_bits=0.5,
            train=TrainConfig(steps=1500, batch=32, lr=1e-3, chunk=50, checkpoint_every=500),
        ),
        # M computes in bfloat16 (float32 accumulation and state): its dreams run faster than in
        # float32 and its training at the same speed (docs/PERFORMANCE.md has the measured ratios,
        # per machine). 2,000 steps: the latent NLL is flat after about 1,600.
        transition=TransitionConfig(
            compute_dtype="bfloat16",
            train=TrainConfig(steps=2000, batch=32, lr=1e-3, chunk=100, checkpoint_every=1000),
        ),
        evolve=EvolveConfig(generations=60, gens_per_call=5, check_every=10),
        # Two rounds: random data never shows the cart leaving the track (x terminations), so a
        # round-1 controller tends to drift out; round 2 collects with it and teaches M the walls.
        # Its dreams are 100 steps long: 30-step dreams score nearly every candidate alike, too
        # flat to select against a slow drift (docs/RESULTS.md). M's fine-tuning is 600 steps.
        rounds=RoundsConfig(rounds=2, episodes=100, action_noise=0.1, transition_steps=600, generations=40, horizon=100),
    )


def _frugal() -> Config:
    """The `cpu` preset spending as few real steps as it can (the goal: at most 20,000 for
    training). How its settings were chosen, seed by seed: docs/RESULTS.md section 8."""
    cpu = _cpu()
    return dataclasses.replace(
        cpu,
        preset="frugal",
        # 200 random episodes (about 4,500 steps): more random data did not give better round-1 agents
        data=DataConfig(episodes=200),
        # Real checks of 4 episodes every 20 generations; half the dreams start from the states the
        # latest check reached (the late-episode states random data lacks, at no extra steps). The
        # search stops at its first check at 490 once 4 more episodes confirm it (the 8 episodes'
        # mean must reach it too): a few episodes' mean needs a margin above 475 to say that 100
        # episodes' will reach it. The checks are sequential: one stops after the episode from which
        # it can no longer pass, so a failing check costs about one episode, not four, and no check
        # starts unless the budget covers it whole (docs/RESULTS.md section 13).
        evolve=dataclasses.replace(cpu.evolve, check_every=20, check_episodes=4, grounding=0.5, stop_at=490.0,
                                   confirm_episodes=4, sequential=True),
        # Round 2 always runs, so the kept agent's M has seen the agent's own data: it collects up to
        # 30 episodes of the agent, at most 8,000 steps, and fine-tunes M for one step per 8 new rows.
        # Up to 80 generations: with checks every 20, as many checks as the cpu preset's 40 every 10.
        # A third round runs only if round 2 did not solve, within a budget of 20,000 real steps for
        # training: it collects half of what is left and its search checks until the rest is spent.
        rounds=dataclasses.replace(cpu.rounds, rounds=3, episodes=30, generations=80, min_rounds=2, env_steps=8000,
                                   transition_rows_per_step=8, budget=20_000),
    )


# The actor PPO trains when a config switches to it (`with_trainer`): one tanh layer of 64 units
# (purejaxrl's width); Ha's linear controller stays CMA-ES's.
PPO_CONTROLLER = ControllerConfig(kind="mlp", mlp_hidden=64)


def with_trainer(cfg: Config, trainer: str) -> Config:
    """cfg searching C with `trainer`: "ppo" also gives C PPO_CONTROLLER's shape, "cmaes" Ha's
    linear controller; the trainer cfg already has returns cfg unchanged."""
    if trainer not in TRAINERS:
        raise ConfigError(f"EvolveConfig.trainer must be one of {TRAINERS}, got {trainer!r}")
    if trainer == cfg.evolve.trainer:
        return cfg
    controller = dataclasses.replace(PPO_CONTROLLER if trainer == "ppo" else ControllerConfig(),
                                     **_action_fields(cfg.controller))
    return dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, trainer=trainer), controller=controller)


def _action_fields(ctrl: ControllerConfig) -> dict:
    return {"actions": ctrl.actions, "continuous": ctrl.continuous, "low": ctrl.low, "high": ctrl.high}


def _laptop() -> Config:
    """The brief's laptop recipe: 2,000 random episodes, an LSTM of 128 units, C trained with PPO
    in the dream; the rest as the `cpu` preset, with half the dreams grounded in the latest real
    check's states (its results, and how unreliable grounding is there: docs/RESULTS.md section 9)."""
    cpu = with_trainer(_cpu(), "ppo")
    return dataclasses.replace(
        cpu,
        preset="laptop",
        data=DataConfig(episodes=2000),
        transition=dataclasses.replace(cpu.transition, hidden=128),
        evolve=dataclasses.replace(cpu.evolve, grounding=0.5),
    )


def _smoke() -> Config:
    return Config(
        preset="smoke",
        data=DataConfig(episodes=40, chunk_size=40),
        vae=VAEConfig(
            latent=8,
            filters=(4, 4, 8, 8),
            kl_ramp_steps=10,
            train=TrainConfig(steps=20, batch=8, chunk=10, checkpoint_every=10),
        ),
        transition=TransitionConfig(
            hidden=16,
            seq_len=8,
            train=TrainConfig(steps=20, batch=4, chunk=10, checkpoint_every=10),
        ),
        evolve=EvolveConfig(population=8, generations=4, rollouts=2, horizon=8, gens_per_call=2, check_every=1, check_episodes=2),
        eval=EvalConfig(episodes=4, max_steps=50),
        rounds=RoundsConfig(rounds=2, episodes=4, transition_steps=10, generations=2),
    )


PRESETS = {"smoke": _smoke, "cpu": _cpu, "frugal": _frugal, "laptop": _laptop, "paper": _paper}


def with_compute_dtype(cfg: Config, dtype: str) -> Config:
    """cfg with V and M (and so the dream) computing in `dtype` ("float32" or "bfloat16")."""
    return dataclasses.replace(
        cfg,
        vae=dataclasses.replace(cfg.vae, compute_dtype=dtype),
        transition=dataclasses.replace(cfg.transition, compute_dtype=dtype),
    )


def get_preset(name: str, seed: int | None = None) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return dataclasses.replace(cfg, seed=seed) if seed is not None else cfg


def _step_limit(value: int, old: int, new: int) -> int:
    """A step cap moved to another task: whole episodes (the old task's limit) stay whole (the new
    task's limit); a shorter cap (smoke's 50 evaluation steps) stays, within the new limit."""
    return new if value >= old else min(value, new)


def action_fields(name: str) -> dict:
    """What task `name`'s action space sets in M, K and C: {"actions": a discrete count or a continuous
    vector's size, "continuous": bool}, and for a continuous task C's "low" and "high" (its bounds)."""
    space = envs.spec(name).action_space
    if space.kind == "discrete":
        return {"actions": int(space.n), "continuous": False}
    return {"actions": max(1, int(np.prod(space.shape))), "continuous": True, "low": space.low, "high": space.high}


def with_env(cfg: Config, name: str) -> Config:
    """cfg on task `name` (a wm_jax.envs registry name): M's, K's and C's action input and output
    follow its action space (`action_fields`); the step caps of collection and evaluation follow its
    step limit (`_step_limit`); the solved threshold is its own (None where it has none); and the
    search's evolve.stop_at, set against the old task's returns, becomes the new task's threshold
    where its checks play whole episodes (else None: a check cut short says nothing against the
    threshold; on a task paying -1 per step it would pass at once), and None where it has none
    (the search then runs all its generations; sequential checks, which stop against it, are then
    off). The task cfg already has returns cfg unchanged."""
    if name == cfg.env:
        return cfg
    old, spec = envs.spec(cfg.env), envs.spec(name)
    fields = action_fields(name)
    model = {"actions": fields["actions"], "continuous": fields["continuous"]}
    eval_steps = _step_limit(cfg.eval.max_steps, old.max_steps, spec.max_steps)
    stop_at = spec.solved_threshold if eval_steps >= spec.max_steps else None
    evolve = dataclasses.replace(cfg.evolve, stop_at=stop_at,
                                 confirm_episodes=cfg.evolve.confirm_episodes if stop_at is not None else 0,
                                 sequential=cfg.evolve.sequential and stop_at is not None)
    return dataclasses.replace(
        cfg, env=name, evolve=evolve,
        transition=dataclasses.replace(cfg.transition, **model),
        verifier=dataclasses.replace(cfg.verifier, **model),
        controller=dataclasses.replace(cfg.controller, **{"low": -1.0, "high": 1.0, **fields}),
        data=dataclasses.replace(cfg.data, max_steps=_step_limit(cfg.data.max_steps, old.max_steps, spec.max_steps)),
        eval=dataclasses.replace(cfg.eval, max_steps=eval_steps, solved_at=spec.solved_threshold),
    )


def check_env(cfg: Config) -> None:
    """A ConfigError (one line) unless cfg plays its task as `with_env` sets it up: a registered
    name, M's, K's and C's actions of the task's kind and count (C's bounds the task's), and a
    collection that stops within the task's step limit (its scan does not watch for gymnax's
    truncation)."""
    if cfg.env not in envs.names():
        raise ConfigError(f"unknown environment {cfg.env!r}; known: {', '.join(envs.names())}")
    fields = action_fields(cfg.env)
    for section in ("transition", "verifier", "controller"):
        wanted = fields if section == "controller" else {k: fields[k] for k in ("actions", "continuous")}
        got = {k: getattr(getattr(cfg, section), k) for k in wanted}
        if got != wanted:
            shown = ", ".join(f"{section}.{k}={v!r}" for k, v in got.items())
            raise ConfigError(f"{cfg.env} plays {', '.join(f'{k}={v!r}' for k, v in wanted.items())}, not {shown} (a "
                              f"macro controller's? it plays through wm_jax.search.macro); use presets.with_env")
    ev, most = cfg.evolve, envs.most_return(cfg.env, cfg.eval.max_steps)
    if ev.sequential and most < ev.stop_at:
        raise ConfigError(f"evolve.sequential: no check can reach evolve.stop_at={ev.stop_at:g}, as {cfg.env} returns "
                          f"at most {most:g} in eval.max_steps={cfg.eval.max_steps}")
    limit = envs.spec(cfg.env).max_steps
    if cfg.data.max_steps > limit:
        raise ConfigError(f"data.max_steps={cfg.data.max_steps} is past {cfg.env}'s step limit ({limit})")
