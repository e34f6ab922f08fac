"""Tests for wm_jax.sharding: population scoring, evolution and evaluation episodes split over
several devices give the single-device results.

Several CPU devices need XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is
imported, so that part runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from wm_jax import sharding

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from wm_jax.models import controller, transition, vae
    from wm_jax.search import checks, dream, driver, rollout, sweep
    from wm_jax.presets import get_preset

    cfg = get_preset("smoke")
    cfg = dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, generations=2, check_episodes=8),
                              eval=dataclasses.replace(cfg.eval, max_steps=40))
    latent, hidden = cfg.vae.latent, cfg.transition.hidden
    params = {"vae": vae.init(jax.random.key(0), cfg.vae), "transition": transition.init(jax.random.key(1), cfg.transition, latent)}
    # committed to one device, as parameters restored from a checkpoint are
    params = jax.device_put(params, jax.devices()[0])
    dims = controller.num_params(cfg.controller, latent, hidden)
    mean = jax.random.normal(jax.random.key(2), (20, latent))
    logvar = jnp.full((20, latent), -1.0)
    pop = 0.5 * jax.random.normal(jax.random.key(3), (16, dims))
    ctrl = 0.5 * jax.random.normal(jax.random.key(5), (dims,))
    world = checks.World(m_params=params["transition"], vae_params=params["vae"], starts=(mean, logvar))

    out = {"devices": jax.device_count()}
    scores = dream.score_population(cfg, jax.random.key(4), params["transition"], pop, mean, logvar, 2, 8)
    out["scores"] = np.asarray(scores).tolist()
    ev = rollout.evaluate(cfg, {**params, "controller": ctrl}, jax.random.key(6), 8, 40, batch=8)
    out["eval_returns"], out["eval_kl"] = ev["returns"], ev["latent_kl"]
    with tempfile.TemporaryDirectory() as tmp:
        res = driver.evolve(cfg, jax.random.key(7), world, tmp, progress=False)
    out["evolve_history"], out["evolve_checks"] = res["history"], res["checks"]
    out["evolve_best"] = np.asarray(res["best"]).tolist()
    # a sweep of 8 cells (2 seeds x 4 taus): the cells are split over the devices
    cells = sweep.grid(cfg, seeds=[0, 1], **{"evolve.tau": [0.8, 1.0, 1.2, 1.4]})
    with tempfile.TemporaryDirectory() as tmp:
        swept = sweep.run(cfg, cells, world, tmp, progress=False)
    out["sweep_checks"] = [r["checks"] for r in swept]
    # seeds as a batch axis, split over the devices: 8 seeds' M trained as one program (each its
    # own data, row count and step count), then their searches, each seed in its own world
    from wm_jax.models import train
    rng = np.random.default_rng(0)
    rows = np.asarray([40, 60, 45, 60, 50, 55, 42, 60], np.int32)
    is_first = np.zeros((8, 60), bool)
    is_first[:, ::20] = True
    is_last = np.roll(is_first, -1, axis=1)
    arrays = {"mean": rng.normal(size=(8, 60, latent)).astype(np.float32), "logvar": np.full((8, 60, latent), -3.0, np.float32),
              "action": rng.integers(0, 2, (8, 60)).astype(np.int32), "reward": np.ones((8, 60), np.float32),
              "done": is_last.astype(np.float32), "is_first": is_first, "is_last": is_last, "rows": rows}
    mcfg = dataclasses.replace(cfg, transition=dataclasses.replace(cfg.transition, train=dataclasses.replace(
        cfg.transition.train, steps=6, chunk=3, checkpoint_every=3)))
    keys = jnp.stack([jax.random.key(20 + i) for i in range(8)])
    with tempfile.TemporaryDirectory() as tmp:
        m8, _ = transition.train(mcfg, keys, arrays, tmp, progress=False, seeds=train.Seeds(shared_data=False, batch=1),
                                 limits=[6, 5, 4, 6, 3, 6, 2, 6])
    out["seeds_m"] = [np.concatenate([np.ravel(x[i]) for x in jax.tree.leaves(m8)])[::7].tolist() for i in range(8)]
    worlds = checks.World(m_params=m8, vae_params=jax.tree.map(lambda x: jnp.stack([x] * 8), params["vae"]),
                          starts=(jnp.asarray(arrays["mean"]), jnp.asarray(arrays["logvar"])), rows=jnp.asarray(rows),
                          cells=True)
    hp = jax.tree.map(lambda x: jnp.stack([x] * 8), cfg.hyper())
    with tempfile.TemporaryDirectory() as tmp:
        res = driver.search(cfg, keys, worlds, tmp, hp=hp, progress=False, batched=True, real_steps=[1, 10**6] * 4)
    out["seeds_checks"] = [r["checks"] for r in res]
    print("RESULT " + json.dumps(out))
    """
)


def _start(script: Path, devices: int) -> subprocess.Popen:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads([l for l in stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.mark.slow
def test_sharded_matches_single_device(tmp_path):
    """8 CPU devices against 1 (two processes, the same script): population scores, evaluation
    returns, two CMA-ES generations with their real checks, a sweep of 8 cells, and 8 seeds as a
    batch axis (M trained over them, their searches each in its own world, stopping on its own)
    split over the devices equal the single-device computation up to float rounding (measured:
    scores within 3e-8, the rest identical)."""
    # Both processes at once: most of their time is compilation, one core each.
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    procs = [_start(script, 8), _start(script, 1)]
    try:
        sharded, single = (_result(p) for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert sharded["devices"] == 8 and single["devices"] == 1
    for k in ("scores", "eval_returns", "evolve_best"):
        np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert np.unique(np.round(single["scores"], 4)).size > 1  # candidates differ: not vacuous
    assert abs(sharded["eval_kl"] - single["eval_kl"]) <= 1e-4 * max(1.0, abs(single["eval_kl"]))
    np.testing.assert_allclose(sharded["seeds_m"], single["seeds_m"], rtol=1e-5, atol=1e-6)
    assert [len(c) for c in single["seeds_checks"]] == [1, 2] * 4  # every other seed spent its real steps at once
    rows = lambda r: (r["evolve_history"] + r["evolve_checks"] + [c for cell in r["sweep_checks"] for c in cell]
                      + [c for cell in r["seeds_checks"] for c in cell])
    assert len(rows(sharded)) == len(rows(single)) == 2 + 2 + 8 * 2 + 12
    for a, b in zip(rows(sharded), rows(single)):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5, atol=1e-5)


def test_single_device_is_untouched():
    """With one device the helpers return their input itself: programs are the unsharded ones."""
    assert jax.device_count() == 1
    x = {"a": jax.numpy.ones((4, 3)), "b": np.zeros(5)}
    for fn in (sharding.shard_leading, sharding.replicated, sharding.put_replicated):
        assert fn(x) is x
    assert sharding.mesh().shape == {sharding.AXIS: 1}
