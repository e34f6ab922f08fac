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

from wm_jax import sharding

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from wm_jax import controller, dream, evolve, rollout, sharding, transition, vae
    from wm_jax.config import get_preset

    cfg = get_preset("smoke")
    latent, hidden = cfg.vae.latent, cfg.transition.hidden
    params = {"vae": vae.init(jax.random.key(0), cfg.vae), "transition": transition.init(jax.random.key(1), cfg.transition, latent)}
    # committed to one device, as parameters restored from a checkpoint are
    params = jax.device_put(params, jax.devices()[0])
    dims = controller.num_params(cfg.controller, latent, hidden)
    mean = jax.random.normal(jax.random.key(2), (20, latent))
    logvar = jnp.full((20, latent), -1.0)
    pop = 0.5 * jax.random.normal(jax.random.key(3), (16, dims))
    ctrl = 0.5 * jax.random.normal(jax.random.key(5), (dims,))

    def real_check(k, c):
        return rollout.evaluate(cfg, {**params, "controller": c}, k, 8, 40, batch=8)

    def results():
        out = {}
        scores = dream.score_population(cfg, jax.random.key(4), params["transition"], pop, mean, logvar, 2, 8)
        out["scores"] = np.asarray(scores).tolist()
        ev = real_check(jax.random.key(6), ctrl)
        out["eval_returns"], out["eval_kl"] = ev["returns"], ev["latent_kl"]
        with tempfile.TemporaryDirectory() as tmp:
            res = evolve.evolve(cfg, jax.random.key(7), params["transition"], (mean, logvar), real_check, tmp,
                                generations=2, progress=False)
        out["evolve_history"], out["evolve_checks"] = res["history"], res["checks"]
        out["evolve_best"] = np.asarray(res["best"]).tolist()
        return out

    sharded = results()
    # The reference: the same calls with the sharding helpers switched off, all on one device.
    for name in ("shard_leading", "replicated", "put_replicated"):
        setattr(sharding, name, lambda tree: tree)
    jax.clear_caches()
    single = results()
    print("RESULT " + json.dumps({"devices": jax.device_count(), "sharded": sharded, "single": single}))
    """
)


def test_sharded_matches_single_device(tmp_path):
    """8 CPU devices: population scores, evaluation returns and two CMA-ES generations (with real
    checks) split over the devices equal the unsharded computation up to float rounding (measured:
    scores within 3e-8, the rest identical)."""
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    assert res["devices"] == 8
    sharded, single = res["sharded"], res["single"]
    for k in ("scores", "eval_returns", "evolve_best"):
        np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert np.unique(np.round(single["scores"], 4)).size > 1  # candidates differ: not vacuous
    assert abs(sharded["eval_kl"] - single["eval_kl"]) <= 1e-4 * max(1.0, abs(single["eval_kl"]))
    for a, b in zip(sharded["evolve_history"] + sharded["evolve_checks"], single["evolve_history"] + single["evolve_checks"]):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5, atol=1e-5)


def test_single_device_is_untouched():
    """With one device the helpers return their input itself: programs are the unsharded ones."""
    assert jax.device_count() == 1
    x = {"a": jax.numpy.ones((4, 3)), "b": np.zeros(5)}
    for fn in (sharding.shard_leading, sharding.replicated, sharding.put_replicated):
        assert fn(x) is x
    assert sharding.mesh().shape == {sharding.AXIS: 1}
