"""benchmarks/torch_dream.py dreams the same dream as wm_jax.search.dream (skipped without the torch extra):
with M's weights copied over and the same starts and noise, every candidate's mean return agrees."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.models import controller, imagination, transition
from wm_jax.search import dream
from wm_jax.config import Config, EvolveConfig, TransitionConfig, VAEConfig

torch = pytest.importorskip("torch")


def _torch_dream():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_dream.py"
    spec = importlib.util.spec_from_file_location("torch_dream", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _t(x):
    return torch.from_numpy(np.array(x, np.float32))


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_torch_dream_matches_the_jax_dream(tau):
    latent, hidden, population, rollouts, horizon = 8, 16, 3, 4, 12
    cfg = Config(vae=VAEConfig(latent=latent), transition=TransitionConfig(hidden=hidden, head="gaussian"),
                 evolve=EvolveConfig(tau=tau))
    m = transition.init(jax.random.key(0), cfg.transition, latent)
    m = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), m)  # biases, a done that fires
    dims = controller.num_params(cfg.controller, latent, hidden)
    pop = jax.random.normal(jax.random.key(2), (population, dims))
    mean, logvar = jax.random.normal(jax.random.key(3), (50, latent)), jnp.full((50, latent), -2.0)
    key = jax.random.key(4)
    want = np.asarray(dream.score_population(cfg, key, m, pop, mean, logvar, rollouts, horizon))

    # the starts and noise the JAX dream draws (dream.scores, imagination.imagine)
    key_s, key_d = jax.random.split(key)
    starts = dream.draw_starts(key_s, mean, logvar, rollouts)
    noise = jnp.stack([jax.vmap(lambda k: imagination.latent_noise(k, latent, 1)[1])(jax.random.split(k, horizon))
                       for k in jax.random.split(key_d, rollouts)], axis=1)  # [H, R, latent]

    td = _torch_dream()
    model = td.Dream(latent, hidden, 1)
    p = m["params"]
    lstm = p["lstm"]
    with torch.no_grad():
        model.cell.weight_ih.copy_(_t(jnp.concatenate([lstm[f"i{g}"]["kernel"] for g in "ifgo"], -1).T))
        model.cell.weight_hh.copy_(_t(jnp.concatenate([lstm[f"h{g}"]["kernel"] for g in "ifgo"], -1).T))
        model.cell.bias_hh.copy_(_t(jnp.concatenate([lstm[f"h{g}"]["bias"] for g in "ifgo"])))
        model.cell.bias_ih.zero_()
        head_w = p["latent_head"]["kernel"].reshape(hidden, latent, 1, 3)[:, :, 0, 1:].reshape(hidden, 2 * latent)
        head_b = p["latent_head"]["bias"].reshape(latent, 1, 3)[:, 0, 1:].reshape(2 * latent)
        model.latent_head.weight.copy_(_t(head_w.T))
        model.latent_head.bias.copy_(_t(head_b))
        for name in ("reward_head", "done_head"):
            getattr(model, name).weight.copy_(_t(p[name]["kernel"].T))
            getattr(model, name).bias.copy_(_t(p[name]["bias"]))
    ctrl_w = _t(pop[:, : (latent + hidden) * 2].reshape(population, latent + hidden, 2))
    ctrl_b = _t(pop[:, (latent + hidden) * 2:])
    got = model(ctrl_w, ctrl_b, _t(starts), _t(noise), None, tau).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert len(set(np.round(want, 3))) > 1  # the candidates differ: the comparison is not vacuous
