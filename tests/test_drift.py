"""Tests for the drift measurement (wm_jax.search.drift)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from wm_jax.models import transition, vae, verifier
from wm_jax.search import drift
from wm_jax.store import data
from wm_jax.presets import get_preset

SMOKE = get_preset("smoke")
LATENT = SMOKE.vae.latent


@pytest.fixture(scope="module")
def arrays():
    lengths = np.array([3, 9, 14])
    episode = np.repeat(np.arange(3), lengths)
    t = np.concatenate([np.arange(n) for n in lengths])
    index = data.EpisodeIndex.from_columns(episode, t)
    n = len(episode)
    rng = np.random.default_rng(1)
    cols = {"action": rng.integers(0, 2, n).astype(np.int32), "reward": np.ones(n, np.float32), "done": index.is_last}
    return transition.training_arrays(rng.normal(size=(n, LATENT)).astype(np.float32),
                                      np.full((n, LATENT), -1.0, np.float32), cols, index)


def test_pad_episodes(arrays):
    ep = drift.pad_episodes(arrays)
    assert ep["mean"].shape == (3, 14, LATENT) and ep["action"].shape == (3, 14)
    np.testing.assert_array_equal(ep["length"], [3, 9, 14])
    np.testing.assert_array_equal(ep["mean"][1, :9], arrays["mean"][3:12])


@pytest.mark.slow
def test_measure_curves(arrays):
    params = {
        "vae": vae.init(jax.random.key(0), SMOKE.vae),
        "transition": transition.init(jax.random.key(1), SMOKE.transition, LATENT),
        "verifier": verifier.init(jax.random.key(2), SMOKE.verifier, LATENT, SMOKE.transition.hidden),
    }
    ep = drift.pad_episodes(arrays)
    res = drift.measure(SMOKE, jax.random.key(3), params, ep, max_k=10, stride=4, decode_pairs=2, batch=4)
    # starts: episode 0 at t0 = 0; episode 1 at 0, 4; episode 2 at 0, 4, 8, 12
    assert res["rollouts"] == 7
    assert res["k"] == list(range(11))
    assert res["latent_mse"][0] == 0.0 and res["frame_mse"][0] == 0.0  # k = 0 is the real latent
    expected = [sum(t0 + k <= n - 1 for n, t0 in [(3, 0), (9, 0), (9, 4), (14, 0), (14, 4), (14, 8), (14, 12)]) for k in range(1, 11)]
    assert res["count"][1:] == expected
    for name in ("latent_mse", "kl", "confidence"):
        values = res[name][1:]
        for v, c in zip(values, expected):
            assert (v is None) == (c == 0)
            assert v is None or np.isfinite(v)
    assert all(v is None or 0.0 <= v <= 1.0 for v in res["confidence"][1:])
    assert res["latent_mse"][1] > 0.0
    res_again = drift.measure(SMOKE, jax.random.key(3), params, ep, max_k=10, stride=4, decode_pairs=2, batch=4)
    assert res_again == res  # deterministic for a fixed key
