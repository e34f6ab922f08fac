"""Frozen, validated configuration: one dataclass per component (the presets are in presets.py).

Two kinds of field (rejax's split, evosax's strategy vs params):
- static: sizes, step counts, horizons, population, modes. They shape the XLA program, so jitted
  functions take them as a static argument and a new value compiles a new program.
- traced (declared with `traced(...)`): float hyperparameters such as tau, CMA-ES sigma, learning
  rates, the verifier's threshold and the grounding share. `cfg.hyper()` returns them as a nested
  dict pytree of float32 arrays that jit traces: a new value reuses the compiled program, and a
  grid of values is one `jax.vmap`. `cfg.static()` is the config a jitted function is keyed on:
  every traced field replaced by a `Traced` marker, so that two configs differing only in traced
  values hit one compile cache entry, and code that reads a traced value from the static config
  fails with the field's name instead of silently baking it in.
Both kinds are plain Python values here, checked once at construction. Nothing is ever mutated:
derive variants with `dataclasses.replace` (validation runs again).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp

from wm_jax.schema import (ConfigError, Section, check_seed, from_dict, non_negative, one_of, positive,
                           traced)


COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class DataConfig(Section):
    episodes: int = 5000  # the recipe's random rollouts
    seed: int = 123
    max_steps: int = 500
    chunk_size: int = 1000

    def __post_init__(self) -> None:
        positive(self, "episodes", "max_steps", "chunk_size")
        check_seed(self, "seed")


@dataclass(frozen=True)
class TrainConfig(Section):
    """Shared by every model trained with wm_jax.models.train.fit."""

    steps: int = 10_000
    batch: int = 256
    lr: float = traced(1e-3)
    clip_norm: float = traced(1.0)
    chunk: int = 100  # optimizer steps per jitted lax.scan call (and per progress update)
    checkpoint_every: int = 1000  # steps; rounded up to a whole number of chunks
    max_to_keep: int = 2
    max_bad_steps: int = 20  # consecutive non-finite updates before the run is stopped

    def __post_init__(self) -> None:
        positive(self, "steps", "batch", "lr", "clip_norm", "chunk", "checkpoint_every", "max_to_keep", "max_bad_steps")


@dataclass(frozen=True)
class VAEConfig(Section):
    latent: int = 64
    filters: tuple[int, ...] = (32, 64, 128, 256)  # four stride-2 4x4 convolutions (Ha)
    kl_ramp_steps: int = 10_000  # beta goes linearly 0 -> 1 over these steps
    free_bits: float = 0.0  # floor on the total KL of free_bits * latent nats (Ha's kl_tolerance=0.5); 0 = off
    # dtype of the forward and backward pass; parameters, optimizer state and losses stay float32
    compute_dtype: str = "float32"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=10_000, batch=256, lr=1e-3))

    def __post_init__(self) -> None:
        positive(self, "latent")
        one_of(self, "compute_dtype", COMPUTE_DTYPES)
        if len(self.filters) != 4 or any(f <= 0 for f in self.filters):
            raise ConfigError(f"VAEConfig.filters must be four positive widths, got {self.filters!r}")
        non_negative(self, "kl_ramp_steps", "free_bits")
        if self.kl_ramp_steps > self.train.steps:
            raise ConfigError(
                f"VAEConfig.kl_ramp_steps ({self.kl_ramp_steps}) is longer than training ({self.train.steps} steps)"
            )


@dataclass(frozen=True)
class TransitionConfig(Section):
    hidden: int = 256
    head: str = "mdn"  # "mdn" (mixture density, Ha) or "gaussian" (diagonal)
    mixtures: int = 5
    seq_len: int = 32
    # Deaths are rare: up-weight the positive class (Ha's doomrnn). This shifts the done head's
    # calibration, so the dream's p > 0.5 rule ends dreams earlier (pessimistic) than p_true > 0.5.
    done_pos_weight: float = 10.0
    reward_weight: float = 1.0
    done_weight: float = 1.0
    # dtype of M's matmul inputs (weights and activations), in training and in the dream; the
    # matmuls accumulate and return float32, and parameters, optimizer state, the LSTM's
    # element-wise work and carry, losses, sampling and returns stay float32
    compute_dtype: str = "float32"
    # Drift mitigations, off unless measured to help (docs/RESULTS.md): dropout on M's input z while
    # training (probability per dimension), and a penalty weight on the squared norm of the
    # predicted z' (the mixture mean, per dimension).
    input_dropout: float = 0.0
    z_penalty: float = 0.0
    # A contrastive latent loss (InfoNCE, off at weight 0; docs/RESULTS.md section 11): M's predicted
    # z' (the mixture mean) scored against the true z' (positive), the z' M predicts under the
    # other action from the same state, and the true z' of every other step in the batch
    # (negatives); score = -mean squared distance / temperature.
    contrastive: float = 0.0
    contrastive_temperature: float = 0.1
    # M's action input: a one-hot of `actions` (a discrete task's count, CartPole's 2, or a macro-M's
    # number of macros, wm_jax.search.macro), or with `continuous` a dense map of an action vector of
    # `actions` numbers; checkpoints record each only when it is not CartPole's (transition.model_config)
    actions: int = 2
    continuous: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=20_000, batch=100, lr=1e-3))

    def __post_init__(self) -> None:
        positive(self, "hidden", "mixtures", "seq_len", "done_pos_weight", "contrastive_temperature", "actions")
        non_negative(self, "reward_weight", "done_weight", "z_penalty", "contrastive")
        one_of(self, "head", ("mdn", "gaussian"))
        one_of(self, "compute_dtype", COMPUTE_DTYPES)
        if not 0.0 <= self.input_dropout < 1.0:
            raise ConfigError(f"TransitionConfig.input_dropout must be in [0, 1), got {self.input_dropout!r}")


@dataclass(frozen=True)
class ControllerConfig(Section):
    kind: str = "linear"  # Ha's action = argmax(W [z, h] + b); "mlp" adds one tanh layer
    mlp_hidden: int = 16
    # How many numbers C outputs: a discrete task's action count (CartPole's 2; a macro controller's
    # macros) whose argmax it plays, or with `continuous` the action vector's size, each output
    # squashed into [low, high] (the task's bounds: one number for every dimension, or one per dimension)
    actions: int = 2
    continuous: bool = False
    low: float | tuple[float, ...] = -1.0
    high: float | tuple[float, ...] = 1.0

    def __post_init__(self) -> None:
        one_of(self, "kind", ("linear", "mlp"))
        positive(self, "mlp_hidden", "actions")
        low, high = (v if isinstance(v, tuple) else (v,) * self.actions for v in (self.low, self.high))
        if len(low) != self.actions or len(high) != self.actions or any(a >= b for a, b in zip(low, high)):
            raise ConfigError(f"ControllerConfig bounds must be one number or {self.actions} with low < high, got "
                              f"low={self.low!r}, high={self.high!r}")


def grounded_count(share: Any, rollouts: int) -> Any:
    """How many of `rollouts` dreams a grounding share starts from real-check states (halves round
    up). In float32 jnp, so that validation here and the traced share in the dream agree."""
    return jnp.floor(jnp.asarray(share, jnp.float32) * rollouts + 0.5).astype(jnp.int32)


TRAINERS = ("cmaes", "ppo")  # how C is searched (EvolveConfig.trainer)


@dataclass(frozen=True)
class EvolveConfig(Section):
    population: int = 64  # Ha
    sigma: float = traced(0.1)  # Ha
    generations: int = 100
    rollouts: int = 30  # the recipe: 30 dream rollouts per candidate
    horizon: int = 30  # the recipe: 30-step dreams
    tau: float = traced(1.0)
    # generations per block of random keys: a block's keys are split(fold_in(key, block start), block),
    # so the random numbers a search draws depend on this, not on how its periods are cut
    gens_per_call: int = 5
    check_every: int = 10  # generations between real checks of the CMA-ES mean (PPO: its greedy policy)
    check_episodes: int = 16
    # Grounding (a drift mitigation, off by default): this share of the dream rollouts starts from
    # states the checked controller reached in its latest real check (refreshed every check_every
    # generations, at no extra env steps); the rest from the stored posteriors.
    grounding: float = traced(0.0)
    # The search ends at the first real check whose mean return reaches this (None: it runs all
    # its generations), and a run's rounds after rounds.min_rounds are skipped once its best
    # agent's check has (rounds.skip_solved).
    # Every check and every round's data cost real steps.
    stop_at: float | None = None
    # A check whose mean return reaches stop_at runs this many more real episodes of the same
    # candidate (other keys) before it counts: the candidate's check is then the mean over all of
    # them (check_episodes + confirm_episodes), so a lucky pass of a few episodes does not end the
    # search. Only a passing check pays for them (0: off).
    confirm_episodes: int = 0
    # Sequential checks (needs stop_at): a check's episodes (then its confirming ones) count one
    # after another, and the check stops after the episode from which it can no longer pass (its
    # returns so far, and the task's most an episode can return for each episode still to play,
    # stay short of stop_at's mean); only the episodes it played are counted, scored and grounded
    # on. With rounds.budget, a check starts only while the budget left covers all its episodes at
    # the step limit (Config.check_cost), so the run never spends past the budget.
    sequential: bool = False
    # How C is searched: "cmaes" (Ha: evosax CMA-ES over the flat controller) or "ppo" (PPO in the
    # dream env, the `ppo` section). Everything else here holds for both: a PPO generation is
    # ppo.updates updates, and the checks, stop_at, tau and horizon (a dream episode's length at
    # most) are the same; grounding is the share of CMA-ES's dreams, and the probability that a
    # PPO dream resets to a pool state.
    trainer: str = "cmaes"

    def __post_init__(self) -> None:
        one_of(self, "trainer", TRAINERS)
        if self.population < 2:
            raise ConfigError(f"EvolveConfig.population must be >= 2, got {self.population!r}")
        positive(self, "sigma", "generations", "rollouts", "horizon", "tau", "gens_per_call", "check_every", "check_episodes")
        if not 0.0 <= self.grounding <= 1.0:
            raise ConfigError(f"EvolveConfig.grounding must be in [0, 1], got {self.grounding!r}")
        if self.confirm_episodes < 0:
            raise ConfigError(f"EvolveConfig.confirm_episodes must be >= 0, got {self.confirm_episodes!r}")
        if self.sequential and self.stop_at is None:
            raise ConfigError("EvolveConfig.sequential stops a check once it cannot reach stop_at, which is None: "
                              "set stop_at or sequential=False")
        if self.confirm_episodes and self.stop_at is None:
            raise ConfigError(f"EvolveConfig.confirm_episodes={self.confirm_episodes} confirms checks that reach "
                              "stop_at, which is None: set stop_at or confirm_episodes=0")
        # CMA-ES grounds a rounded count of its dreams (PPO's resets draw the share as a probability)
        if self.trainer == "cmaes" and self.grounding > 0 and int(grounded_count(self.grounding, self.rollouts)) == 0:
            raise ConfigError(f"EvolveConfig.grounding={self.grounding!r} of {self.rollouts} rollouts grounds no dream "
                              f"(it rounds to 0); use at least {0.5 / self.rollouts:.3g}")


@dataclass(frozen=True)
class PPOConfig(Section):
    """PPO in the dream (evolve.trainer = "ppo"): purejaxrl's recipe on batches of imagined steps."""

    envs: int = 512  # dreams stepped side by side
    steps: int = 32  # imagined steps per dream and update (a batch is envs * steps)
    updates: int = 4  # updates per generation (evolve.generations and check_every count generations)
    epochs: int = 4
    minibatches: int = 8
    critic_hidden: int = 64  # the critic: two tanh layers on [z, h]; the actor is the controller
    lr: float = traced(1e-3)
    gamma: float = traced(0.99)
    gae_lambda: float = traced(0.95)
    clip: float = traced(0.2)
    ent_coef: float = traced(0.01)
    vf_coef: float = traced(0.5)
    max_grad_norm: float = traced(0.5)

    def __post_init__(self) -> None:
        positive(self, "envs", "steps", "updates", "epochs", "minibatches", "critic_hidden", "lr", "clip",
                  "max_grad_norm")
        non_negative(self, "ent_coef", "vf_coef")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if (self.envs * self.steps) % self.minibatches:
            raise ConfigError(f"PPOConfig.minibatches ({self.minibatches}) must divide a batch of envs * steps = "
                              f"{self.envs * self.steps} imagined steps")


@dataclass(frozen=True)
class EvalConfig(Section):
    episodes: int = 100
    max_steps: int = 500
    solved_at: float | None = 475.0  # the task's solved threshold (CartPole-v1's); None: the task has none

    def __post_init__(self) -> None:
        positive(self, "episodes", "max_steps")


@dataclass(frozen=True)
class VerifierConfig(Section):
    """K(h, z, a, z') -> p(real): trained contrastively, its confidence weights the dream reward."""

    mode: str = "off"  # off: plain dream reward; weight: reward * p; cutoff: the dream ends where p < threshold
    threshold: float = traced(0.5)
    hidden: int = 128
    noise: float = 1.0  # perturbed negatives: z' + noise * (per-dimension spread of the posterior means) * eps
    # K's action input, as M's (TransitionConfig.actions and continuous: a one-hot of a discrete
    # task's or a macro-M's actions, or the action vector); checkpoints record each only when it is
    # not CartPole's (verifier.model_config)
    actions: int = 2
    continuous: bool = False
    seq_len: int = 32  # windows for the open-loop negatives (drift of 1 .. seq_len - 1 steps)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1000, batch=32, lr=1e-3, chunk=100, checkpoint_every=500)
    )

    def __post_init__(self) -> None:
        one_of(self, "mode", ("off", "weight", "cutoff"))
        positive(self, "hidden", "noise", "seq_len", "actions")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"VerifierConfig.threshold must be in (0, 1), got {self.threshold!r}")
        if self.seq_len < 2:
            raise ConfigError(f"VerifierConfig.seq_len must be >= 2, got {self.seq_len!r}")


@dataclass(frozen=True)
class RoundsConfig(Section):
    """Ha's iterative procedure: collect with the current controller, fine-tune M, evolve again."""

    rounds: int = 1
    episodes: int = 100  # real episodes collected per extra round
    action_noise: float = 0.1  # probability of a random action while collecting
    transition_steps: int = 1000  # fine-tuning steps of M per extra round
    generations: int = 50
    horizon: int | None = None  # dream horizon of the extra rounds; None: evolve.horizon
    # Real steps a round's collection may use at most (None: `episodes` whole episodes): the
    # episode that reaches it is cut there, and later ones are dropped (collection.collect's max_rows).
    env_steps: int | None = None
    # Skip the later rounds once the best agent's real check reaches evolve.stop_at (False: every
    # round runs; stop_at then only ends each search early).
    skip_solved: bool = True
    # Rounds 1..min_rounds run even after a check reached evolve.stop_at (later ones are skipped as
    # skip_solved says): a few check episodes can pass an agent by luck, and a round-1 agent's M
    # has never seen the agent's own data (docs/RESULTS.md section 8).
    min_rounds: int = 1
    # When set, a later round fine-tunes M for (the rows that round collected) // this steps (at
    # least 1) instead of transition_steps: fine-tuning in proportion to the new data. Config.for_round
    # then needs the rows (run_dir.round_config reads them from the collect stage's record).
    transition_rows_per_step: int | None = None
    # Real env steps the run may spend on training (random data, rounds' data and real checks; None:
    # no limit). A later round starts only while some are left (min_rounds included) and collects at
    # most half of them (and at most env_steps), leaving the rest to its search; a search starts no
    # real check once they are spent (its first always runs), so the run ends at most one check past it
    # (round 1's random data is not capped: data.episodes whole episodes).
    budget: int | None = None

    def __post_init__(self) -> None:
        positive(self, "rounds", "episodes", "transition_steps", "generations", "min_rounds")
        if self.min_rounds > self.rounds:
            raise ConfigError(f"RoundsConfig.min_rounds ({self.min_rounds}) must be at most rounds ({self.rounds})")
        for name in ("horizon", "env_steps", "transition_rows_per_step", "budget"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"RoundsConfig.{name} must be a positive int or None, got {value!r}")
        if not 0.0 <= self.action_noise <= 1.0:
            raise ConfigError(f"RoundsConfig.action_noise must be in [0, 1], got {self.action_noise!r}")


@dataclass(frozen=True)
class Config(Section):
    preset: str = "paper"
    seed: int = 0
    # The task (a name in wm_jax.envs' registry); presets.with_env sets the fields that follow from it
    # (action counts and kinds, step limits, the solved threshold) and presets.check_env checks them.
    env: str = "CartPole-v1"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    transition: TransitionConfig = field(default_factory=TransitionConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    evolve: EvolveConfig = field(default_factory=EvolveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        check_seed(self, "seed")
        k, m = (self.verifier.actions, self.verifier.continuous), (self.transition.actions, self.transition.continuous)
        if k != m:  # K judges M's transitions, actions and all
            raise ConfigError(f"verifier.actions, verifier.continuous = {k} must equal "
                              f"transition.actions, transition.continuous = {m}")

    def for_round(self, r: int, new_rows: int | None = None) -> Config:
        """The config of round r of Ha's iterative procedure: round 1 is this config; later rounds
        fine-tune M for rounds.transition_steps (or, with rounds.transition_rows_per_step, for
        new_rows // it steps: new_rows is the rows round r collected) and evolve for
        rounds.generations generations in dreams of rounds.horizon steps (when set)."""
        if r == 1:
            return self
        steps, per = self.rounds.transition_steps, self.rounds.transition_rows_per_step
        if per is not None:
            if new_rows is None:
                raise ConfigError(f"round {r}'s config needs the rows it collected: rounds.transition_rows_per_step="
                                  f"{per} sets M's fine-tuning steps from them")
            steps = max(1, int(new_rows) // per)
        horizon = self.evolve.horizon if self.rounds.horizon is None else self.rounds.horizon
        return dataclasses.replace(
            self,
            transition=dataclasses.replace(
                self.transition, train=dataclasses.replace(self.transition.train, steps=steps)),
            evolve=dataclasses.replace(self.evolve, generations=self.rounds.generations, horizon=horizon),
        )

    def solved(self, best_real: float) -> bool:
        """The best agent's real check reached evolve.stop_at: the rounds after it are skipped (their
        data and checks would cost real steps to replace an agent that is already as good as asked)."""
        return self.evolve.stop_at is not None and best_real >= self.evolve.stop_at

    def skips_round(self, r: int, best_real: float | None) -> bool:
        """Round r (and every later one) is skipped: it is past rounds.min_rounds, rounds.skip_solved
        is on, and the best agent's check (None before the first) reached evolve.stop_at."""
        return (r > self.rounds.min_rounds and self.rounds.skip_solved and best_real is not None
                and self.solved(best_real))

    def budget_left(self, used: int) -> int | None:
        """The real steps rounds.budget leaves after `used` (None: no budget; <= 0: spent)."""
        return None if self.rounds.budget is None else self.rounds.budget - int(used)

    def check_cost(self) -> int:
        """The most real steps one check can spend: its episodes and its confirming ones, each to
        the step limit."""
        return (self.evolve.check_episodes + self.evolve.confirm_episodes) * self.eval.max_steps

    def check_reserve(self) -> int:
        """The budget a search keeps for its next check: Config.check_cost with sequential checks
        (a check starts only if it cannot overrun the budget), else 0 (a check starts while any is left)."""
        return self.check_cost() if self.evolve.sequential else 0

    def later_round_fits(self, used: int) -> bool:
        """A later round may start after `used` real steps: no budget, or some of it left, and with
        sequential checks enough for an episode's worth of data (eval.max_steps) and one check."""
        left = self.budget_left(used)
        return left is None or left - self.check_reserve() >= (self.eval.max_steps if self.evolve.sequential else 1)

    def collect_cap(self, used: int) -> int | None:
        """The rows a later round may collect after `used` real steps: rounds.env_steps, and at most
        half the budget left (the other half is its search's checks), and with sequential checks at
        most what leaves one check's cost; None: no cap."""
        left = self.budget_left(used)
        caps = [self.rounds.env_steps]
        if left is not None:
            caps += [max(1, left // 2)] + ([max(1, left - self.check_cost())] if self.evolve.sequential else [])
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Config:
        return from_dict(Config, d)
