"""Tests for training over a seed axis (wm_jax.models.train.Seeds): V, M and K of several seeds as
one program, each seed equal to its lone training (its own key, data, row count and step count)."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax import interrupt
from wm_jax.models import train as train_lib
from wm_jax.models import transition, vae, verifier
from wm_jax.config import Config, TrainConfig, TransitionConfig, VAEConfig, VerifierConfig
from wm_jax.store import data

LATENT = 4
M_CFG = Config(vae=VAEConfig(latent=LATENT),
               transition=TransitionConfig(hidden=16, head="mdn", mixtures=2, seq_len=8,
                                           train=TrainConfig(steps=12, batch=4, chunk=4, checkpoint_every=4)),
               verifier=VerifierConfig(mode="weight", hidden=8, seq_len=6,
                                       train=TrainConfig(steps=8, batch=4, chunk=4, checkpoint_every=4)))


def _arrays(n_episodes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 25, n_episodes)
    episode = np.repeat(np.arange(n_episodes), lengths).astype(np.int32)
    t = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    idx = data.EpisodeIndex.from_columns(episode, t)
    n = episode.size
    return {"mean": rng.normal(size=(n, LATENT)).astype(np.float32),
            "logvar": np.full((n, LATENT), -3.0, np.float32), "action": rng.integers(0, 2, n).astype(np.int32),
            "reward": np.ones(n, np.float32), "done": idx.is_last.astype(np.float32),
            "is_first": idx.is_first, "is_last": idx.is_last}


def _padded(arrays: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The seeds' arrays stacked, each padded to the longest with its last row, and their "rows"."""
    n = max(len(a["mean"]) for a in arrays)
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])  # noqa: E731
    out = {k: np.stack([pad(a[k]) for a in arrays]) for k in arrays[0]}
    return {**out, "rows": np.asarray([len(a["mean"]) for a in arrays], np.int32)}


def _steps(cfg: Config, section: str, steps: int) -> Config:
    sec = getattr(cfg, section)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sec, train=dataclasses.replace(sec.train, steps=steps))})


def _close(batched, lone, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda b, a: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol),
                 batched, lone)


def _seed(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


@pytest.mark.parametrize("batch", [1, 2])
def test_m_over_seeds_with_their_own_rows_and_steps_equals_lone_trainings(tmp_path, batch):
    """Two seeds' datasets of different sizes padded to one shape, and a step count each: every
    seed's M equals its lone training on its unpadded data (batch=1 one after another, 2 vmapped)."""
    arrays = [_arrays(5, 0), _arrays(8, 1)]
    keys = jnp.stack([jax.random.key(10), jax.random.key(11)])
    limits = [8, 12]
    params, info = transition.train(M_CFG, keys, _padded(arrays), tmp_path / "batched", progress=False,
                                    seeds=train_lib.Seeds(shared_data=False, batch=batch), limits=limits)
    rows = train_lib.read_metrics(tmp_path / "batched")
    assert [(r["step"], r["cell"]) for r in rows] == [(s, i) for s in (4, 8, 12) for i in (0, 1)]
    assert np.isnan(rows[-2]["loss"]) and np.isfinite(rows[-1]["loss"])  # seed 0 stood still after its 8 steps
    for i, (a, steps) in enumerate(zip(arrays, limits)):
        lone, _ = transition.train(_steps(M_CFG, "transition", steps), keys[i], a, tmp_path / f"lone{i}",
                                   progress=False)
        _close(_seed(params, i), lone)
    loaded = transition.load(M_CFG, tmp_path / "batched", info["identity"], seeds=2)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), loaded, params)


V_CFG = Config(vae=VAEConfig(latent=LATENT, filters=(4, 4, 8, 8), kl_ramp_steps=5,
                             train=TrainConfig(steps=8, batch=4, chunk=4, checkpoint_every=4)))


def _frames():
    lengths = [12, 9, 15]
    episode = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    t = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    frames = ((np.random.default_rng(0).random((episode.size, 64, 64)) < 0.2) * 255).astype(np.uint8)
    return {"frame": frames, "stack_rows": data.EpisodeIndex.from_columns(episode, t).stack_rows}


def test_v_over_seeds_on_shared_data_equals_lone_trainings_and_resumes_after_an_interrupt(tmp_path, monkeypatch):
    d = _frames()
    keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
    seeds = train_lib.Seeds(shared_data=True, batch=1)
    real_chunk, calls = train_lib.run_chunk, []

    def chunk_then_sigint(*args):
        calls.append(1)
        out = real_chunk(*args)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # deferred to the chunk boundary
        return out

    monkeypatch.setattr(train_lib, "run_chunk", chunk_then_sigint)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), interrupt.deferred():
            vae.train(V_CFG, keys, d, tmp_path / "batched", progress=False, seeds=seeds)
    finally:
        signal.signal(signal.SIGINT, before)
    monkeypatch.setattr(train_lib, "run_chunk", real_chunk)
    params, info = vae.train(V_CFG, keys, d, tmp_path / "batched", progress=False, seeds=seeds)
    assert info["resumed_from"] == 4
    for i in range(2):
        lone, _ = vae.train(V_CFG, keys[i], d, tmp_path / f"lone{i}", progress=False)
        _close(_seed(params, i), lone)
    _close(vae.load(V_CFG, tmp_path / "batched", info["identity"], seeds=2), params, 0, 0)


def test_k_over_seeds_each_against_its_own_m_equals_lone_trainings(tmp_path):
    arrays = [_arrays(5, 2), _arrays(7, 3)]
    m = [transition.init(jax.random.key(20 + i), M_CFG.transition, LATENT) for i in range(2)]
    keys = jnp.stack([jax.random.key(30), jax.random.key(31)])
    stacked_m = jax.tree.map(lambda *x: jnp.stack(x), *m)
    params, _ = verifier.train(M_CFG, keys, _padded(arrays), tmp_path / "batched", progress=False, m_params=stacked_m,
                               seeds=train_lib.Seeds(batch=2))
    for i in range(2):
        lone, _ = verifier.train(M_CFG, keys[i], arrays[i], tmp_path / f"lone{i}", progress=False, m_params=m[i])
        _close(_seed(params, i), lone)


def test_limits_out_of_range_are_one_named_error(tmp_path):
    with pytest.raises(ValueError, match="transition: limits must be 2 step counts in \\[0, 12\\]"):
        transition.train(M_CFG, jnp.stack([jax.random.key(0)] * 2), _padded([_arrays(3, 0), _arrays(3, 1)]),
                         tmp_path, progress=False, seeds=train_lib.Seeds(shared_data=False), limits=[4, 13])
