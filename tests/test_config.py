"""Tests for wm_jax.config: validation messages, presets, the dict/JSON round trip, immutability."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from wm_jax.config import (
    Config,
    ConfigError,
    ControllerConfig,
    DataConfig,
    EvalConfig,
    EvolveConfig,
    RoundsConfig,
    TrainConfig,
    TransitionConfig,
    VAEConfig,
)
from wm_jax.presets import PRESETS, get_preset, with_compute_dtype


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# (constructor, kwargs, text that the message must contain: the class-qualified field name)
BAD = [
    # sizes <= 0
    (VAEConfig, {"latent": 0}, "VAEConfig.latent"),
    (VAEConfig, {"latent": -3}, "VAEConfig.latent"),
    (TransitionConfig, {"hidden": 0}, "TransitionConfig.hidden"),
    (TransitionConfig, {"hidden": -1}, "TransitionConfig.hidden"),
    (TransitionConfig, {"mixtures": 0}, "TransitionConfig.mixtures"),
    (TransitionConfig, {"seq_len": 0}, "TransitionConfig.seq_len"),
    (TrainConfig, {"batch": 0}, "TrainConfig.batch"),
    (TrainConfig, {"batch": -8}, "TrainConfig.batch"),
    (TrainConfig, {"steps": 0}, "TrainConfig.steps"),
    (TrainConfig, {"steps": -1}, "TrainConfig.steps"),
    (TrainConfig, {"lr": 0.0}, "TrainConfig.lr"),
    (TrainConfig, {"lr": float("nan")}, "TrainConfig.lr"),
    (TrainConfig, {"chunk": 0}, "TrainConfig.chunk"),
    (TrainConfig, {"max_bad_steps": 0}, "TrainConfig.max_bad_steps"),
    (EvolveConfig, {"horizon": 0}, "EvolveConfig.horizon"),
    (EvolveConfig, {"horizon": -5}, "EvolveConfig.horizon"),
    (EvolveConfig, {"rollouts": 0}, "EvolveConfig.rollouts"),
    (EvolveConfig, {"sigma": 0.0}, "EvolveConfig.sigma"),
    (DataConfig, {"episodes": 0}, "DataConfig.episodes"),
    (EvalConfig, {"episodes": 0}, "EvalConfig.episodes"),
    (ControllerConfig, {"mlp_hidden": 0}, "ControllerConfig.mlp_hidden"),
    (RoundsConfig, {"rounds": 0}, "RoundsConfig.rounds"),
    (RoundsConfig, {"env_steps": 0}, "RoundsConfig.env_steps"),
    (RoundsConfig, {"env_steps": True}, "RoundsConfig.env_steps"),
    (RoundsConfig, {"budget": 0}, "RoundsConfig.budget"),
    (RoundsConfig, {"budget": 2.5e4}, "RoundsConfig.budget"),
    (RoundsConfig, {"min_rounds": 0}, "RoundsConfig.min_rounds"),
    (RoundsConfig, {"transition_rows_per_step": 0}, "RoundsConfig.transition_rows_per_step"),
    (RoundsConfig, {"transition_rows_per_step": True}, "RoundsConfig.transition_rows_per_step"),
    (RoundsConfig, {"rounds": 2, "min_rounds": 3}, "RoundsConfig.min_rounds"),
    # population
    (EvolveConfig, {"population": 1}, "EvolveConfig.population"),
    (EvolveConfig, {"population": 0}, "EvolveConfig.population"),
    # KL ramp longer than training
    (VAEConfig, {"kl_ramp_steps": 101, "train": TrainConfig(steps=100)}, "VAEConfig.kl_ramp_steps"),
    (VAEConfig, {"kl_ramp_steps": -1}, "VAEConfig.kl_ramp_steps"),
    (VAEConfig, {"free_bits": -0.5}, "VAEConfig.free_bits"),
    # unknown head / kind
    (TransitionConfig, {"head": "lstm"}, "TransitionConfig.head"),
    (TransitionConfig, {"compute_dtype": "float16"}, "TransitionConfig.compute_dtype"),
    (VAEConfig, {"compute_dtype": "bf16"}, "VAEConfig.compute_dtype"),
    (ControllerConfig, {"kind": "transformer"}, "ControllerConfig.kind"),
    # action_noise outside [0, 1]
    (RoundsConfig, {"action_noise": -0.01}, "RoundsConfig.action_noise"),
    (RoundsConfig, {"action_noise": 1.01}, "RoundsConfig.action_noise"),
    # bad filters
    (VAEConfig, {"filters": (4, 4, 8)}, "VAEConfig.filters"),
    (VAEConfig, {"filters": (4, 4, 8, 8, 16)}, "VAEConfig.filters"),
    (VAEConfig, {"filters": (4, 0, 8, 8)}, "VAEConfig.filters"),
    (VAEConfig, {"filters": (4, 4, -8, 8)}, "VAEConfig.filters"),
]


@pytest.mark.parametrize("cls, kwargs, field_name", BAD, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD])
def test_validation_message_names_the_field(cls, kwargs, field_name):
    with pytest.raises(ConfigError) as exc:
        cls(**kwargs)
    assert isinstance(exc.value, ValueError)
    assert field_name in str(exc.value)


def test_value_is_quoted_in_message():
    with pytest.raises(ConfigError, match=r"TransitionConfig\.head must be one of .*'lstm'"):
        TransitionConfig(head="lstm")
    with pytest.raises(ConfigError, match=r"EvolveConfig\.population must be >= 2, got 1"):
        EvolveConfig(population=1)
    with pytest.raises(ConfigError, match=r"kl_ramp_steps \(101\) is longer than training \(100 steps\)"):
        VAEConfig(kl_ramp_steps=101, train=TrainConfig(steps=100))


def test_boundaries_are_accepted():
    EvolveConfig(population=2)
    RoundsConfig(action_noise=0.0)
    RoundsConfig(action_noise=1.0)
    RoundsConfig(rounds=2, min_rounds=2)
    VAEConfig(kl_ramp_steps=100, train=TrainConfig(steps=100))  # ramp == training is fine
    VAEConfig(kl_ramp_steps=0, train=TrainConfig(steps=1))
    TransitionConfig(head="gaussian")
    ControllerConfig(kind="mlp")


def test_replace_revalidates():
    cfg = get_preset("smoke")
    with pytest.raises(ConfigError, match="VAEConfig.latent"):
        dataclasses.replace(cfg.vae, latent=0)
    with pytest.raises(ConfigError, match="VAEConfig.kl_ramp_steps"):
        dataclasses.replace(cfg.vae, train=dataclasses.replace(cfg.vae.train, steps=cfg.vae.kl_ramp_steps - 1))


def test_unknown_preset():
    with pytest.raises(ConfigError) as exc:
        get_preset("nope")
    msg = str(exc.value)
    assert "preset" in msg and "'nope'" in msg
    for name in PRESETS:
        assert name in msg  # lists the choices


@pytest.mark.parametrize("name", ["smoke", "cpu", "frugal", "paper"])
def test_presets_construct_and_round_trip(name):
    cfg = get_preset(name)
    assert isinstance(cfg, Config)
    assert cfg.preset == name
    assert Config.from_dict(cfg.to_dict()) == cfg
    # through JSON, where tuples come back as lists
    back = Config.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    assert isinstance(back.vae.filters, tuple)
    assert isinstance(back.vae.train, TrainConfig)
    assert isinstance(back.transition.train, TrainConfig)


def test_get_preset_seed():
    assert get_preset("smoke", seed=7).seed == 7
    assert get_preset("smoke").seed == 0
    assert get_preset("smoke", seed=7).vae == get_preset("smoke").vae


def test_paper_preset_matches_recipe():
    cfg = get_preset("paper")
    assert cfg.data.episodes == 5000 and cfg.data.seed == 123
    v = cfg.vae
    assert v.train.batch == 256
    assert v.train.lr == pytest.approx(1e-3)
    assert v.kl_ramp_steps == 10_000
    assert v.train.steps == 10_000
    assert v.filters == (32, 64, 128, 256)
    assert v.latent == 64
    t = cfg.transition
    assert t.hidden == 256
    assert t.train.steps == 20_000
    assert t.seq_len == 32
    assert t.mixtures == 5
    assert t.head == "mdn"
    e = cfg.evolve
    assert e.population == 64
    assert e.sigma == pytest.approx(0.1)
    assert e.rollouts == 30
    assert e.horizon == 30
    assert cfg == Config()  # the defaults are the paper recipe


def test_configs_are_frozen():
    cfg = get_preset("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vae.latent = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vae.train.steps = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.transition.head = "gaussian"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.evolve.population = 3  # type: ignore[misc]
    hash(cfg.vae.train)  # hashable: usable as a static jit argument


def test_compute_dtype_defaults_and_old_configs():
    """float32 by default (the cpu preset runs M in bfloat16); configs written before the field
    existed load as float32."""
    assert Config().vae.compute_dtype == Config().transition.compute_dtype == "float32"
    cfg = get_preset("cpu")
    assert (cfg.vae.compute_dtype, cfg.transition.compute_dtype) == ("float32", "bfloat16")
    old = cfg.to_dict()
    del old["vae"]["compute_dtype"], old["transition"]["compute_dtype"]
    assert Config.from_dict(old) == with_compute_dtype(cfg, "float32")
    bf16 = with_compute_dtype(cfg, "bfloat16")
    assert bf16.vae.compute_dtype == bf16.transition.compute_dtype == "bfloat16"
    assert Config.from_dict(json.loads(bf16.to_json())) == bf16
    assert dataclasses.replace(bf16.vae, compute_dtype="float32") == cfg.vae
    assert bf16.transition == dataclasses.replace(cfg.transition, compute_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"Config\.compute_dtype must be one of \('float32', 'bfloat16'\)"):
        with_compute_dtype(cfg, "float16")


def test_for_round_sets_the_later_rounds_sizes():
    cfg = get_preset("cpu")
    assert cfg.for_round(1) is cfg
    r2 = cfg.for_round(2)
    assert r2.transition.train.steps == cfg.rounds.transition_steps
    assert r2.evolve.generations == cfg.rounds.generations and r2.evolve.horizon == cfg.rounds.horizon
    assert r2.vae == cfg.vae and r2.evolve.tau == cfg.evolve.tau
    smoke = get_preset("smoke")  # rounds.horizon None: the dreams keep evolve.horizon
    assert smoke.for_round(2).evolve.horizon == smoke.evolve.horizon


def test_fine_tuning_steps_can_follow_the_rounds_new_rows():
    """rounds.transition_rows_per_step: round r fine-tunes M for its new rows // it steps (at
    least 1); without the rows the config cannot be made, and the error says why."""
    cfg = dataclasses.replace(get_preset("cpu"), rounds=dataclasses.replace(get_preset("cpu").rounds,
                                                                            transition_rows_per_step=8))
    assert cfg.for_round(2, 5101).transition.train.steps == 637
    assert cfg.for_round(2, 8000).transition.train.steps == 1000
    assert cfg.for_round(2, 3).transition.train.steps == 1
    assert cfg.for_round(1) is cfg
    with pytest.raises(ConfigError, match="transition_rows_per_step=8"):
        cfg.for_round(2)
    assert get_preset("cpu").for_round(2, 8000).transition.train.steps == get_preset("cpu").rounds.transition_steps


def test_hyper_is_the_traced_fields_and_static_hides_them():
    import jax

    cfg = get_preset("cpu")
    hp = cfg.hyper()
    assert set(hp) == {"vae", "transition", "evolve", "verifier", "ppo"}
    assert set(hp["evolve"]) == {"sigma", "tau", "grounding"} and set(hp["verifier"]) == {"threshold", "train"}
    assert set(hp["ppo"]) == {"lr", "gamma", "gae_lambda", "clip", "ent_coef", "vf_coef", "max_grad_norm"}
    assert all(leaf.dtype == np.float32 and leaf.shape == () for leaf in jax.tree.leaves(hp))
    assert float(hp["transition"]["train"]["lr"]) == pytest.approx(cfg.transition.train.lr)
    static = cfg.static()
    assert static.evolve.population == cfg.evolve.population  # static fields stay
    with pytest.raises(TypeError, match=r"Config\.transition\.train\.lr is a traced hyperparameter"):
        _ = static.transition.train.lr * 2
    assert Config.from_dict(cfg.to_dict()) == cfg  # the JSON round trip keeps traced fields as plain floats


@pytest.mark.parametrize("d, words", [
    ({"vae": {"latent": "64"}}, ("VAEConfig.latent must be int", "str '64'")),
    ({"vae": {"latent": 64.0}}, ("VAEConfig.latent must be int", "float")),
    ({"vae": {"latent": True}}, ("VAEConfig.latent must be int", "bool")),
    ({"vae": 5}, ("Config.vae must be VAEConfig", "int 5")),
    ({"evolve": {"tau": "1.0"}}, ("EvolveConfig.tau must be float",)),
    ({"rounds": {"horizon": "x"}}, ("RoundsConfig.horizon must be int | None",)),
    ({"vae": {"filters": [4, "4", 8, 8]}}, ("VAEConfig.filters",)),
    ({"preset": None}, ("Config.preset must be str",)),
])
def test_mistyped_values_name_the_field(d, words):
    """An edited config.json with a wrong type: a ConfigError naming the field, never a TypeError
    from deep inside validation."""
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_numpy_and_jax_scalars_become_python_numbers():
    """Accepted, and stored as the Python number: the config is written as JSON and compared with
    what JSON gives back."""
    import jax.numpy as jnp

    assert Config.from_dict({"evolve": {"tau": 2}}).evolve.tau == 2  # an int is a float's value
    assert Config.from_dict({"rounds": {"horizon": None}}).rounds.horizon is None
    cfg = dataclasses.replace(Config(), seed=np.int64(3))
    assert type(cfg.seed) is int and cfg.seed == 3
    for tau in (np.float32(0.5), jnp.float32(0.5), np.array(0.5)):
        ev = dataclasses.replace(cfg.evolve, tau=tau)
        assert type(ev.tau) is float and ev.tau == 0.5
    horizon = dataclasses.replace(cfg.rounds, horizon=np.int64(7)).horizon
    assert type(horizon) is int
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_floats_must_be_finite(value):
    """JSON has no inf or NaN: such a value would come back from config.json as null."""
    with pytest.raises(ConfigError, match="TrainConfig.clip_norm must be finite"):
        TrainConfig(clip_norm=value)


def test_a_subclass_keeps_its_parents_validation():
    @dataclasses.dataclass(frozen=True)
    class Wider(EvolveConfig):
        note: str = ""

    with pytest.raises(ConfigError, match="EvolveConfig.population must be >= 2"):
        Wider(population=1)
    with pytest.raises(ConfigError, match="Wider.note must be str"):
        Wider(note=3)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seed_range(seed):
    """jax.random.key keeps 32 bits of the seed: 2**32 would be seed 0 under another name."""
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\)"):
        dataclasses.replace(Config(), seed=seed)
    with pytest.raises(ConfigError, match=r"DataConfig.seed must be in"):
        DataConfig(seed=seed)
    assert dataclasses.replace(Config(), seed=2**32 - 1).seed == 2**32 - 1


def test_frugal_is_the_cpu_preset_with_fewer_real_steps():
    """frugal changes only what spends real steps: random episodes, checks, grounding, the stop
    and its confirmation, the later rounds' episodes, generations and budget; V, M, C and the evaluation are the cpu preset's."""
    cpu, frugal = get_preset("cpu"), get_preset("frugal")
    for section in ("vae", "transition", "controller", "eval", "verifier"):
        assert getattr(frugal, section) == getattr(cpu, section), section
    assert frugal.data.episodes < cpu.data.episodes and frugal.rounds.episodes < cpu.rounds.episodes
    assert frugal.evolve.check_episodes * cpu.evolve.check_every < cpu.evolve.check_episodes * frugal.evolve.check_every
    # a check 15 above the solved mark ends the search, once 4 more episodes confirm it
    assert frugal.evolve.stop_at == frugal.eval.solved_at + 15 and cpu.evolve.stop_at is None
    assert frugal.evolve.confirm_episodes == frugal.evolve.check_episodes == 4 and cpu.evolve.confirm_episodes == 0
    # round 2 always runs, on at most 8,000 new rows, fine-tuning M one step per 8 of them; a
    # third only if round 2 did not solve, within 20,000 real steps for training
    assert frugal.rounds.min_rounds == 2 and frugal.rounds.rounds == 3 and cpu.rounds.min_rounds == 1
    assert frugal.rounds.budget == 20_000 and cpu.rounds.budget is None
    assert frugal.rounds.env_steps == 8000 and cpu.rounds.env_steps is None
    assert frugal.for_round(2, 5101).transition.train.steps == 637
    assert cpu.rounds.transition_rows_per_step is None


def test_laptop_is_the_cpu_preset_with_the_briefs_laptop_recipe():
    """laptop: 2,000 random episodes, an LSTM of 128, PPO (with its actor) and grounded dreams;
    everything else is the cpu preset's."""
    import dataclasses

    from wm_jax.presets import PPO_CONTROLLER, with_trainer

    cpu, laptop = get_preset("cpu"), get_preset("laptop")
    assert laptop.data.episodes == 2000 and laptop.transition.hidden == 128
    assert laptop.evolve.trainer == "ppo" and laptop.controller == PPO_CONTROLLER and laptop.evolve.grounding == 0.5
    back = dataclasses.replace(
        with_trainer(laptop, "cmaes"), preset="cpu", data=cpu.data,
        transition=dataclasses.replace(laptop.transition, hidden=cpu.transition.hidden),
        evolve=dataclasses.replace(laptop.evolve, trainer="cmaes", grounding=cpu.evolve.grounding))
    assert back == cpu
