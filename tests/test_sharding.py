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
    returns, two CMA-ES generations with their real checks, and a sweep of 8 cells split over the
    devices equal the single-device computation up to float rounding (measured: scores within
    3e-8, the rest identical)."""
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
    rows = lambda r: r["evolve_history"] + r["evolve_checks"] + [c for cell in r["sweep_checks"] for c in cell]
    assert len(rows(sharded)) == len(rows(single)) == 2 + 2 + 8 * 2
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
