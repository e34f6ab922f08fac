"""The model-free baselines of experiments/sample_efficiency.py (experiments/ppo.py) and the script
itself on a finished smoke run: GAE against a hand computation, the step accounting, learning."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def _load(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXPERIMENTS))


ppo = _load("ppo")


def test_gae_matches_a_hand_computation():
    g, lam = 0.9, 0.5
    reward = jnp.array([[1.0], [1.0], [1.0]])
    value = jnp.array([[0.5], [2.0], [1.0]])
    done = jnp.array([[0.0], [1.0], [0.0]])  # the episode ends after step 1; step 2 starts a new one
    last = jnp.array([3.0])
    adv, ret = ppo.segment_gae(reward, value, done, last, g, lam)
    d2 = 1 + g * 3.0 - 1.0  # bootstraps from the value after the segment
    d1 = 1 - 2.0  # the episode ended: no bootstrap, and no advantage flows back past it
    d0 = 1 + g * 2.0 - 0.5
    want = [d0 + g * lam * d1, d1, d2]
    np.testing.assert_allclose(np.asarray(adv)[:, 0], want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret), np.asarray(adv) + np.asarray(value), rtol=1e-6)


@pytest.mark.slow
def test_ppo_counts_every_step_and_learns_from_the_state():
    pc = ppo.PPOConfig(obs="state", total_steps=4096, eval_every=2048, eval_episodes=16)
    res = ppo.train(pc, [0, 1], progress=False)
    assert [p["real_env_steps"] for p in res["curve"]] == [2048, 4096]  # whole updates of 8 x 32 steps
    assert all(len(p["returns"]) == 2 for p in res["curve"])
    # a random policy lasts about 22 steps; 4,096 steps of PPO already balance far longer
    assert min(res["curve"][-1]["returns"]) > 60, res["curve"]
    again = ppo.train(pc, [0, 1], progress=False)
    assert again["curve"] == res["curve"]  # deterministic for fixed seeds
    assert ppo.steps_to(res["curve"], 0, 1e9) is None and ppo.steps_to(res["curve"], 0, 0.0) == 2048
    assert ppo.steps_to_stay(res["curve"], 0, 1e9) is None and ppo.steps_to_stay(res["curve"], 0, 0.0) == 2048
    # reached, lost, reached again: it stays from the second time on
    bumpy = [{"real_env_steps": n, "returns": [r]} for n, r in ((1, 480.0), (2, 300.0), (3, 490.0), (4, 500.0))]
    assert ppo.steps_to(bumpy, 0, 475.0) == 1 and ppo.steps_to_stay(bumpy, 0, 475.0) == 3


def test_ppo_config_is_checked():
    with pytest.raises(ValueError, match="obs"):
        ppo.PPOConfig(obs="ram")
    with pytest.raises(ValueError, match="minibatches"):
        ppo.PPOConfig(minibatches=3)


@pytest.mark.slow
def test_sample_efficiency_writes_table_and_plot(smoke_run, tmp_path, monkeypatch, capsys):
    out, summary = smoke_run
    se = _load("sample_efficiency")
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# R\n\n{se.BEGIN}\nold table\n{se.END}\n\nafter\n")
    monkeypatch.setattr(sys, "argv", ["sample_efficiency.py", str(out), "--ppo-seeds", "0", "--ppo-state-steps", "256",
                                      "--ppo-pixel-steps", "256", "--out", str(tmp_path), "--results-md", str(doc)])
    se.main()
    md_doc = doc.read_text()
    assert "old table" not in md_doc and md_doc.endswith(f"{se.END}\n\nafter\n")
    assert (tmp_path / "sample_efficiency.md").read_text() in md_doc
    for name in ("sample_efficiency.png", "sample_efficiency.json", "sample_efficiency.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = json.loads((tmp_path / "sample_efficiency.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["wm_jax (pixels)", "PPO (state)", "PPO (pixels)"]
    assert rows[0]["training_steps"] == summary["real_env_steps_training"]
    assert rows[0]["curve"] == summary["learning_curve"]
    assert rows[1]["training_steps"] == rows[2]["training_steps"] == 256
    md = (tmp_path / "sample_efficiency.md").read_text()
    assert md.count("\n") == 2 + len(rows) and f"{summary['real_env_steps_training']:,}" in md
    # the PPO curves are cached: a second call reads them instead of training again
    monkeypatch.setattr(ppo, "train", lambda *a, **k: pytest.fail("PPO trained again"))
    monkeypatch.setattr(se, "ppo", ppo)
    se.main()
