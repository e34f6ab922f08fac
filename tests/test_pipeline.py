"""Smoke test of the whole recipe: `pipeline.run` on the smoke preset, its run directory and summary,
idempotent reruns, resuming after a crash, and the Agent loaded from the finished directory.

The full pipeline runs once per session (conftest.smoke_run, about a minute on 2 CPU cores); the
resume test runs it once more in a second directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_experiment

from wm_jax import cli, pipeline, run_dir, stats
from wm_jax import stages as stages_lib
from wm_jax.models import transition, vae
from wm_jax.search import driver, rollout
from wm_jax.store import collection, data
from wm_jax.agent import Agent
from wm_jax.config import ConfigError
from wm_jax.presets import get_preset
from wm_jax.envs.cartpole import PixelCartPole

SMOKE = get_preset("smoke")
STAGES = ("collect", "vae", "encode_round1", "transition", "evolve_round1", "collect_round2", "encode_round2",
          "transition_round2", "evolve_round2", "evaluate")
assert SMOKE.rounds.rounds == 2  # smoke exercises the iterative round as well


@pytest.fixture(scope="module")
def finished(smoke_run) -> tuple[Path, dict]:
    return smoke_run  # conftest.py: one finished smoke run per session


@pytest.fixture(scope="module")
def agent(finished) -> Agent:
    return Agent.load(finished[0])


def _same(a, b) -> bool:
    """Deep equality that treats NaN as equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _raise(name):
    def fn(*args, **kwargs):
        raise AssertionError(f"{name} was called")

    return fn


# ------------------------------------------------------------------------------------------------
# the run directory and its summary


def test_run_dir_layout(finished):
    out, _ = finished
    for rel in (
        "summary.json", "config.json", "stages.json", "agent.json", "controller.npy",
        "vae/checkpoints", "vae/metrics.jsonl", "vae/reconstructions.png", "vae/loss.png",
        "transition/checkpoints", "evolve_round1/evolve.jsonl", "evolve_round1/controller.npy",
        "data/round2", "transition_round2/checkpoints", "evolve_round2/controller.npy",
        "dream_vs_real.png", "episode_strip.png", "imagined_rollouts.npz", "data/round1",
    ):
        assert (out / rel).exists(), rel
    for png in ("vae/reconstructions.png", "vae/loss.png", "dream_vs_real.png", "episode_strip.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert any((out / "vae" / "checkpoints").iterdir()) and any((out / "transition" / "checkpoints").iterdir())
    assert data.load_dataset(out / "data" / "round1").num_rows > 0
    assert json.loads((out / "config.json").read_text()) == {**json.loads(SMOKE.to_json()),
                                                             "format_version": run_dir.FORMAT_VERSION}
    assert set(json.loads((out / "stages.json").read_text())) == set(STAGES)
    ctrl = np.load(out / "controller.npy")
    # the final agent is the round whose real checks were best, with that round's M
    agent_meta = json.loads((out / "agent.json").read_text())
    rnd = agent_meta["round"]
    stages = json.loads((out / "stages.json").read_text())
    assert stages[f"evolve_round{rnd}"]["best_real"] == max(stages[f"evolve_round{r}"]["best_real"] for r in (1, 2))
    assert agent_meta["transition_dir"] == ("transition" if rnd == 1 else f"transition_round{rnd}")
    np.testing.assert_array_equal(ctrl, np.load(out / f"evolve_round{rnd}" / "controller.npy"))
    assert ctrl.shape == (2 * (SMOKE.vae.latent + SMOKE.transition.hidden) + 2,) and np.isfinite(ctrl).all()
    lines = [json.loads(x) for x in (out / "evolve_round1" / "evolve.jsonl").read_text().splitlines()]
    ev = SMOKE.evolve
    expected = sorted(set(range(ev.check_every, ev.generations + 1, ev.check_every)) | {ev.generations})
    assert [e["generation"] for e in lines] == expected
    with np.load(out / "imagined_rollouts.npz") as z:
        assert z["z"].shape[1:] == (ev.horizon, SMOKE.vae.latent)
        assert z["reward"].shape[1:] == z["alive"].shape[1:] == (ev.horizon,)


def test_summary_schema(finished):
    out, summary = finished
    on_disk = json.loads((out / "summary.json").read_text())
    assert _same(on_disk, summary)
    required = {
        "preset", "seed", "real_return_mean", "real_return_std", "real_episodes", "solved", "real_env_steps",
        "dream_real_corr", "latent_kl", "wall_s", "device", "versions",
    }
    assert required <= summary.keys(), required - summary.keys()
    assert set(stages_lib.SUMMARY_KEYS) <= summary.keys()
    assert summary["preset"] == "smoke" and summary["seed"] == SMOKE.seed
    assert summary["real_episodes"] == SMOKE.eval.episodes
    assert isinstance(summary["solved"], bool)
    assert summary["solved"] == (summary["real_return_mean"] >= SMOKE.eval.solved_at)
    assert isinstance(summary["device"], str) and summary["device"]
    for pkg in ("jax", "flax", "optax", "evosax", "gymnax"):
        assert summary["versions"].get(pkg, "missing") != "missing", pkg
    # every numeric metric is finite (dream_real_corr: see test_dream_real_corr_is_finite)
    for k in ("real_return_mean", "real_return_std", "real_return_min", "latent_kl"):
        assert isinstance(summary[k], float) and math.isfinite(summary[k]), (k, summary[k])
    assert 0 < summary["real_return_min"] <= summary["real_return_mean"] <= SMOKE.eval.max_steps
    assert summary["real_return_std"] >= 0
    assert isinstance(summary["real_env_steps"], int) and summary["real_env_steps"] > 0
    wall = summary["wall_s"]
    assert set(wall) == set(STAGES) | {"total"}
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in wall.values()), wall
    assert wall["total"] == pytest.approx(sum(wall[s] for s in STAGES))
    # env steps add up: random data + real checks during evolution + the final evaluation
    stages = json.loads((out / "stages.json").read_text())
    assert summary["real_env_steps"] == (
        stages["collect"]["env_steps"] + stages["evolve_round1"]["real_env_steps"]
        + stages["collect_round2"]["env_steps"] + stages["evolve_round2"]["real_env_steps"]
        + stages["evaluate"]["env_steps"]
    )


def test_every_real_step_is_counted_once(finished):
    """The training's real steps are the rows of the datasets on disk (random data, then each
    round's) plus the steps of every real check, and the learning curve walks through them in the
    order they were spent, ending at summary.json's real_env_steps_training."""
    out, summary = finished
    stages = json.loads((out / "stages.json").read_text())
    rows = {r: data.load_dataset(out / "data" / f"round{r}").num_rows for r in (1, 2)}
    assert stages["collect"]["env_steps"] == rows[1] and stages["collect_round2"]["env_steps"] == rows[2]
    for r in (1, 2):
        checks = stages[f"evolve_round{r}"]["checks"]
        assert stages[f"evolve_round{r}"]["real_env_steps"] == sum(c["env_steps"] for c in checks) > 0
        # a check's steps are its episodes' lengths: at least one step each, at most max_steps
        assert all(SMOKE.evolve.check_episodes <= c["env_steps"] <= SMOKE.evolve.check_episodes * SMOKE.eval.max_steps
                   for c in checks)
    checks = [c for r in (1, 2) for c in stages[f"evolve_round{r}"]["checks"]]
    assert summary["real_env_steps_training"] == rows[1] + rows[2] + sum(c["env_steps"] for c in checks)
    assert summary["real_env_steps"] == summary["real_env_steps_training"] + stages["evaluate"]["env_steps"]

    curve = summary["learning_curve"]
    assert [p["source"] for p in curve] == (["collect"] + ["check"] * len(stages["evolve_round1"]["checks"])
                                            + ["collect"] + ["check"] * len(stages["evolve_round2"]["checks"])
                                            + ["evaluate"])
    spent = [curve[0]["real_env_steps"]] + [b["real_env_steps"] - a["real_env_steps"] for a, b in itertools.pairwise(curve)]
    assert spent == [rows[1]] + [c["env_steps"] for c in stages["evolve_round1"]["checks"]] + [rows[2]] + [
        c["env_steps"] for c in stages["evolve_round2"]["checks"]] + [0]  # the evaluation's steps are not training's
    assert curve[-1]["real_env_steps"] == summary["real_env_steps_training"]
    assert curve[-1]["real_return"] == summary["real_return_mean"]
    assert [p["real_return"] for p in curve if p["source"] == "check"] == [c["real_return"] for c in checks]
    # a collection's return: its episodes' mean length (CartPole pays 1 per step)
    assert curve[0]["real_return"] == pytest.approx(rows[1] / SMOKE.data.episodes)
    assert curve[0]["episodes"] == SMOKE.data.episodes and curve[-1]["episodes"] == SMOKE.eval.episodes


@pytest.mark.slow
@pytest.mark.parametrize("confirm", [0, 3])
def test_a_solved_agent_ends_the_search_and_the_rounds(tmp_path, confirm):
    """evolve.stop_at: round 1's search ends at its first check that reaches it and round 2 (its
    data, M, search) is skipped, so no real step is spent after it; the run finishes and reruns.
    With evolve.confirm_episodes, the passing check's confirming episodes are counted once, in the
    check's steps and its learning-curve point."""
    cfg = dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, stop_at=0.0, confirm_episodes=confirm))
    out = tmp_path / "solved"
    summary = pipeline.run(cfg, out, progress=False)
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"collect", "vae", "encode_round1", "transition", "evolve_round1", "evaluate"}
    assert [c["generation"] for c in stages["evolve_round1"]["checks"]] == [SMOKE.evolve.check_every]
    check, episodes = stages["evolve_round1"]["checks"][0], SMOKE.evolve.check_episodes + confirm
    assert (check.get("confirm_return") is not None) == bool(confirm)
    assert episodes <= check["env_steps"] <= episodes * SMOKE.eval.max_steps  # each episode 1 to max_steps
    assert summary["learning_curve"][1]["episodes"] == episodes
    assert stages["evolve_round1"]["generations"] == SMOKE.evolve.check_every < SMOKE.evolve.generations
    assert summary["agent_round"] == 1
    assert summary["real_env_steps_training"] == (stages["collect"]["env_steps"]
                                                  + stages["evolve_round1"]["checks"][0]["env_steps"])
    assert [p["source"] for p in summary["learning_curve"]] == ["collect", "check", "evaluate"]
    assert json.loads((out / "agent.json").read_text())["round"] == 1
    (out / "agent.json").unlink()  # derived: a rerun of the finished run rewrites it
    assert _same(pipeline.run(cfg, out, progress=False), summary)
    assert json.loads((out / "agent.json").read_text())["round"] == 1
    agent = Agent.load(out)
    obs, _ = PixelCartPole().reset(jax.random.key(0))
    assert agent.act(agent.initial_carry(), obs)[0] in (0, 1)


@pytest.mark.parametrize("r,best_real,min_rounds,skip_solved,skipped", [
    (1, 500.0, 1, True, False),  # round 1 always runs
    (2, 500.0, 1, True, True),
    (2, 474.0, 1, True, False),  # not solved
    (2, 500.0, 2, True, False),  # within min_rounds
    (3, 500.0, 2, True, True),
    (3, 474.0, 2, True, False),  # past min_rounds but not solved: runs
    (2, 500.0, 1, False, False),  # skip_solved off: every round runs
    (3, 500.0, 2, False, False),
])
def test_which_rounds_a_solved_agent_skips(r, best_real, min_rounds, skip_solved, skipped):
    cfg = dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, stop_at=475.0), rounds=dataclasses.replace(
        SMOKE.rounds, rounds=3, min_rounds=min_rounds, skip_solved=skip_solved))
    assert cfg.skips_round(r, best_real) == skipped
    assert not dataclasses.replace(cfg, evolve=SMOKE.evolve).skips_round(r, best_real)  # no stop_at


@pytest.mark.slow
def test_a_spent_budget_ends_the_search_and_the_rounds(tmp_path):
    """rounds.budget: once the run's training steps reach it, round 1's search starts no more checks
    (its first runs) and the later rounds are skipped, min_rounds' included; every step counted once."""
    cfg = dataclasses.replace(SMOKE, rounds=dataclasses.replace(SMOKE.rounds, rounds=3, min_rounds=2, budget=1))
    out = tmp_path / "spent"
    summary = pipeline.run(cfg, out, progress=False)
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"collect", "vae", "encode_round1", "transition", "evolve_round1", "evaluate"}
    assert [c["generation"] for c in stages["evolve_round1"]["checks"]] == [SMOKE.evolve.check_every]
    assert stages["evolve_round1"]["generations"] == SMOKE.evolve.check_every < SMOKE.evolve.generations
    assert summary["real_env_steps_training"] == (stages["collect"]["env_steps"]
                                                  + stages["evolve_round1"]["checks"][0]["env_steps"])
    assert _same(pipeline.run(cfg, out, progress=False), summary)


@pytest.mark.slow
def test_a_budget_gives_round_2_half_of_what_is_left_and_its_search_the_rest(tmp_path, monkeypatch):
    """rounds.budget with round 2 running (min_rounds=2; stop_at ends each search at its first
    check): round 2's collection is capped at half the budget left after round 1, and each search
    is allowed what is left when it starts (round 2's after its collection)."""
    budget = 1_000_000
    seen = {"max_rows": [], "real_steps": []}
    collect, search = collection.collect, driver.evolve

    def spy_collect(*args, **kwargs):
        seen["max_rows"].append(kwargs.get("max_rows"))
        return collect(*args, **kwargs)

    def spy_search(*args, **kwargs):
        seen["real_steps"].append(kwargs.get("real_steps"))
        return search(*args, **kwargs)

    monkeypatch.setattr(collection, "collect", spy_collect)
    monkeypatch.setattr(driver, "evolve", spy_search)
    cfg = dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, stop_at=0.0), rounds=dataclasses.replace(
        SMOKE.rounds, min_rounds=2, budget=budget))
    summary = pipeline.run(cfg, tmp_path / "run", progress=False)
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    random_data, check1 = stages["collect"]["env_steps"], stages["evolve_round1"]["real_env_steps"]
    round2 = stages["collect_round2"]["env_steps"]
    assert seen["max_rows"] == [None, (budget - random_data - check1) // 2]
    assert seen["real_steps"] == [budget - random_data, budget - random_data - check1 - round2]
    assert summary["real_env_steps_training"] == random_data + check1 + round2 + stages["evolve_round2"]["real_env_steps"]


@pytest.mark.parametrize("budget, env_steps, used, cap", [
    (None, None, 100, None),  # no limit: every episode whole
    (None, 50, 100, 50),
    (1000, None, 600, 200),  # half the budget left: the other half is the search's checks
    (1000, 150, 600, 150),
    (1000, None, 999, 1),
])
def test_a_later_rounds_collection_is_capped_by_half_the_budget_left(budget, env_steps, used, cap):
    cfg = dataclasses.replace(SMOKE, rounds=dataclasses.replace(SMOKE.rounds, budget=budget, env_steps=env_steps))
    assert cfg.collect_cap(used) == cap
    assert cfg.budget_left(used) == (None if budget is None else budget - used)


@pytest.mark.parametrize("used, cap, fits", [
    (600, 200, True),  # half the budget left; a check's worst case (2 x 50) fits after it
    (850, 50, True),  # the budget left less a check's worst case: 150 - 100
    (860, 40, False),  # less than an episode's worth of data (50) besides the check: no later round
    (1000, 1, False),
])
def test_with_sequential_checks_a_later_round_leaves_room_for_a_whole_check(used, cap, fits):
    """evolve.sequential: a check starts only if the budget left covers its worst case (Config.check_cost,
    2 episodes of 50 steps here), so a later round collects at most what leaves one, and starts only
    with an episode's worth of data (eval.max_steps) to collect besides; the search keeps it in reserve."""
    cfg = dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, stop_at=40.0, sequential=True),
                              rounds=dataclasses.replace(SMOKE.rounds, budget=1000))
    assert cfg.check_cost() == cfg.check_reserve() == 100
    assert cfg.collect_cap(used) == cap and cfg.later_round_fits(used) == fits
    plain = dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, sequential=False))
    assert plain.check_reserve() == 0 and plain.later_round_fits(999) and not plain.later_round_fits(1000)


@pytest.mark.slow
@pytest.mark.parametrize("extra, rounds", [(450, 3), (230, 1)])
def test_with_sequential_checks_a_run_never_spends_past_its_budget(tmp_path, extra, rounds):
    """evolve.sequential with rounds.budget: every check starts with its worst case (Config.check_cost)
    still in the budget, plays at most its episodes, and counts only the steps of those it played; a
    later round starts only with room for an episode of data and a check (with 230 steps past the
    random data, round 1's checks leave less); the run's training steps stay within the budget."""
    base = dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, stop_at=50.0, confirm_episodes=2,
                                                                 sequential=True))
    random_data = len(collection.collect(jax.random.key(base.data.seed), base.data.episodes,
                                         max_steps=base.data.max_steps, chunk_size=base.data.chunk_size,
                                         progress=False, env=base.env))
    cfg = dataclasses.replace(base, rounds=dataclasses.replace(SMOKE.rounds, rounds=3, min_rounds=3,
                                                               budget=random_data + extra))
    out = tmp_path / "run"
    summary = pipeline.run(cfg, out, progress=False)
    done = json.loads((out / "stages.json").read_text())
    assert done["collect"]["env_steps"] == random_data and cfg.check_cost() == 200
    spent, checks = random_data, 0
    for point in stages_lib.learning_curve(cfg, done)[1:-1]:
        if point["source"] == "check":
            assert cfg.rounds.budget - spent >= cfg.check_cost() or point["generation"] == 1
            assert 1 <= point["episodes"] <= 4 and point["real_env_steps"] - spent <= 50 * point["episodes"]
            checks += 1
        spent = point["real_env_steps"]
    assert checks >= 2 and spent == summary["real_env_steps_training"] <= cfg.rounds.budget
    assert stages_lib.rounds_run(cfg, done) == list(range(1, rounds + 1))


@pytest.mark.slow
def test_a_solved_agent_with_every_round_run_and_a_step_budget(tmp_path):
    """rounds.min_rounds=2: round 2 runs although round 1's check reached stop_at (its search
    still stops at its first check), and rounds.env_steps caps its collection, cutting the episode
    that reaches the budget; every step is counted once."""
    budget = 7
    cfg = dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, stop_at=0.0), rounds=dataclasses.replace(
        SMOKE.rounds, min_rounds=2, env_steps=budget, transition_rows_per_step=2))
    out = tmp_path / "every-round"
    summary = pipeline.run(cfg, out, progress=False)
    stages = json.loads((out / "stages.json").read_text())
    assert {"collect_round2", "transition_round2", "evolve_round2"} <= set(stages)
    got = stages["collect_round2"]
    assert got["env_steps"] == got["rows"] == budget == len(data.load_dataset(out / "data" / "round2"))
    assert got["episodes"] <= SMOKE.rounds.episodes
    for r in (1, 2):
        assert [c["generation"] for c in stages[f"evolve_round{r}"]["checks"]] == [SMOKE.evolve.check_every]
    assert summary["real_env_steps_training"] == (stages["collect"]["env_steps"] + budget + sum(
        stages[f"evolve_round{r}"]["checks"][0]["env_steps"] for r in (1, 2)))
    reals = [stages[f"evolve_round{r}"]["best_real"] for r in (1, 2)]
    assert summary["agent_round"] == (2 if reals[1] >= reals[0] else 1)  # ties: the M that saw more data
    # rounds.transition_rows_per_step: round 2 fine-tuned M for its 7 new rows // 2 = 3 steps, and
    # its M loads with the round's config read back from the stages
    assert stages["transition_round2"]["outputs"]["transition_round2"]["step"] == budget // 2
    r2 = run_dir.round_config(cfg, stages, 2)
    assert r2.transition.train.steps == budget // 2
    transition.load(r2, out / "transition_round2", run_dir.stage_output(out, stages, "transition_round2", "transition_round2"))
    if summary["agent_round"] == 2:
        assert json.loads((out / "agent.json").read_text())["transition_steps"] == budget // 2
    Agent.load(out)
    with pytest.raises(ConfigError, match="transition_rows_per_step=2"):  # the rows come from the record
        run_dir.round_config(cfg, {}, 2)
    (out / "stages.json").rename(out / "stages.json.aside")
    with pytest.raises(pipeline.RunDirError, match="stages.json is missing"):  # nothing loads unchecked
        Agent.load(out)


def test_run_refuses_a_macro_controllers_config(tmp_path):
    """The pipeline plays CartPole's two actions: a config with a macro controller's action count
    is refused by name before anything runs."""
    from wm_jax.search import macro
    from wm_jax.config import ConfigError

    cfg = macro.style_config(SMOKE, "twice", macro.MACROS)
    with pytest.raises(ConfigError, match="controller.actions=4"):
        pipeline.run(cfg, tmp_path / "macro", progress=False)
    assert not (tmp_path / "macro").exists()


def test_dream_real_corr_is_finite(finished):
    """The smoke preset must check the CMA-ES mean at least 3 times, or the correlation is NaN."""
    _, summary = finished
    stages = json.loads((finished[0] / "stages.json").read_text())
    assert len(stages["evolve_round1"]["checks"]) >= 3
    assert isinstance(summary["dream_real_corr"], float) and math.isfinite(summary["dream_real_corr"])
    assert -1.0 <= summary["dream_real_corr"] <= 1.0


def test_summary_json_is_strict_json(finished):
    out, _ = finished

    def reject(token):
        raise ValueError(f"summary.json holds {token}, which is not valid JSON")

    for name in ("summary.json", "stages.json", "config.json", "agent.json"):
        json.loads((out / name).read_text(), parse_constant=reject)


def test_summary_with_undefined_corr_is_the_same_in_memory_on_disk_and_on_rerun(finished, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    (out / "summary.json").unlink()  # every stage is done: only the summary is rebuilt
    for mod, name in ((collection, "collect"), (vae, "train"), (transition, "train"), (driver, "evolve"), (rollout, "evaluate")):
        monkeypatch.setattr(mod, name, _raise(f"{mod.__name__}.{name}"))
    monkeypatch.setattr(stats, "correlation", lambda xs, ys: float("nan"))
    first = pipeline.run(SMOKE, out, progress=False)
    on_disk = json.loads((out / "summary.json").read_text())
    again = pipeline.run(SMOKE, out, progress=False)
    assert _same(first, on_disk)
    assert _same(first, again)


def test_rerun_of_finished_dir_does_no_work(finished, monkeypatch):
    out, summary = finished
    for mod, name in ((collection, "collect"), (vae, "train"), (transition, "train"), (driver, "evolve"),
                      (rollout, "evaluate"), (vae, "load"), (transition, "load")):
        monkeypatch.setattr(mod, name, _raise(f"{mod.__name__}.{name}"))
    def mtimes():  # .lock is written by every run: it names the process holding the directory
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    before = mtimes()
    t0 = time.perf_counter()
    again = pipeline.run(SMOKE, out, progress=False)
    assert time.perf_counter() - t0 < 5.0
    assert _same(again, summary)
    assert mtimes() == before  # nothing rewritten


def test_other_config_in_run_dir_raises(finished):
    out, _ = finished
    before = (out / "config.json").read_text()
    for other in (
        dataclasses.replace(SMOKE, seed=1),
        dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, generations=6)),
        get_preset("cpu"),
    ):
        with pytest.raises(pipeline.RunDirError, match="different config"):
            pipeline.run(other, out, progress=False)
    assert (out / "config.json").read_text() == before


def test_run_dir_from_before_compute_dtype_keeps_working(finished, tmp_path):
    """A config.json written without compute_dtype reads as float32: the rerun returns the summary,
    the agent loads (its agent.json, hashed, is the run's own), and a bf16 config is a different config."""
    from wm_jax.presets import with_compute_dtype

    out = tmp_path / "old"
    shutil.copytree(finished[0], out)
    d = json.loads((out / "config.json").read_text())
    del d["vae"]["compute_dtype"], d["transition"]["compute_dtype"]
    (out / "config.json").write_text(json.dumps(d))
    assert _same(pipeline.run(SMOKE, out, progress=False), finished[1])
    assert Agent.load(out).cfg == SMOKE
    with pytest.raises(pipeline.RunDirError, match="different config"):
        pipeline.run(with_compute_dtype(SMOKE, "bfloat16"), out, progress=False)


def test_cli_run_on_finished_dir(finished, capsys):
    out, summary = finished
    assert cli.main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "real_return_mean" in stdout and "wall_s/total" in stdout and str(out / "summary.json") in stdout
    # the same directory with another seed: a one-line error, exit code 2
    assert cli.main(["run", "--preset", "smoke", "--seed", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "different config" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# Agent


def _episode_frames(agent: Agent, key: jax.Array, steps: int) -> list[jax.Array]:
    """Observations of one real episode driven by agent.act (at most `steps`, until it ends)."""
    env = PixelCartPole()
    obs, state = env.reset(key)
    carry = agent.initial_carry()
    frames = []
    for t in range(steps):
        frames.append(obs)
        action, carry = agent.act(carry, obs)
        obs, state, _, terminated, truncated, _ = env.step(jax.random.fold_in(key, t), state, action)
        if bool(terminated) or bool(truncated):
            break
    return frames


def _reactive_agent(agent: Agent) -> Agent:
    """The trained V and M with a hand-made controller that switches action on the most variable
    input feature around its mean, so episodes mix both actions (the smoke controller may not)."""
    cfg = agent.cfg
    env = PixelCartPole()
    obs, state = env.reset(jax.random.key(0))
    carry = agent.initial_carry()
    feats = []
    for t in range(12):  # alternate actions to see the inputs move
        _, carry_next, extra = rollout.agent_step(cfg, agent.params, carry, obs)
        feats.append(np.concatenate([np.asarray(extra["mean"]), np.asarray(transition.hidden(carry))]))
        carry = carry_next
        obs, state, *_ = env.step(jax.random.key(t), state, t % 2)
    feats = np.array(feats)
    d = int(np.argmax(feats.std(0)))
    scale = 10.0 / max(float(feats[:, d].std()), 1e-6)
    w = np.zeros((feats.shape[1], 2), np.float32)
    w[d, 1] = scale
    b = np.array([0.0, -scale * float(feats[:, d].mean())], np.float32)
    ctrl = jnp.asarray(np.concatenate([w.ravel(), b]))
    assert ctrl.shape == agent.params["controller"].shape
    return Agent(cfg, {**agent.params, "controller": ctrl})


def test_agent_load_and_act(agent, finished):
    out, _ = finished
    assert agent.cfg == SMOKE
    np.testing.assert_array_equal(np.asarray(agent.params["controller"]), np.load(out / "controller.npy"))
    obs, _ = PixelCartPole().reset(jax.random.key(0))
    assert obs.shape == (64, 64, 4) and obs.dtype == jnp.uint8
    carry0 = agent.initial_carry()
    action, carry = agent.act(carry0, obs)
    assert action.shape == () and action.dtype == jnp.int32 and int(action) in (0, 1)
    assert jax.tree.structure(carry) == jax.tree.structure(carry0)
    assert [x.shape for x in jax.tree.leaves(carry)] == [x.shape for x in jax.tree.leaves(carry0)]
    assert not np.allclose(np.asarray(transition.hidden(carry)), 0.0)  # M advanced
    # numpy frames work too
    a2, _ = agent.act(carry0, np.asarray(obs))
    assert int(a2) == int(action)


def test_agent_load_missing_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained agent"):
        Agent.load(tmp_path)


def test_agent_act_does_not_retrace(agent, monkeypatch):
    traces = []
    real_step = rollout.agent_step

    def counting_step(*args, **kwargs):
        traces.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(rollout, "agent_step", counting_step)
    fresh = Agent(agent.cfg, agent.params)
    frames = _episode_frames(fresh, jax.random.key(1), 6)
    assert len(frames) >= 4
    carry = fresh.initial_carry()
    sizes = []
    for obs in frames:
        _, carry = fresh.act(carry, obs)
        _, carry = fresh.act(carry, np.asarray(obs))
        sizes.append(fresh._act._cache_size())
    assert len(traces) == 1  # traced once
    assert sizes[-1] == sizes[0] <= 3  # and the dispatch cache does not grow per call


def test_agent_act_compiles_once(agent):
    """The documented loop (carry = initial_carry(); act, act, ...) uses one executable: the initial
    carry must be committed like the carries act returns, or the second call compiles again."""
    fresh = Agent(agent.cfg, agent.params)
    env = PixelCartPole()
    obs, state = env.reset(jax.random.key(1))
    carry = fresh.initial_carry()  # the documented usage
    for t in range(4):
        action, carry = fresh.act(carry, obs)
        obs, state, *_ = env.step(jax.random.key(t), state, action)
    assert fresh._act._cache_size() == 1


@pytest.mark.parametrize("bad", [
    np.zeros((64, 64, 3), np.uint8),
    np.zeros((1, 64, 64, 4), np.uint8),
    np.zeros((64, 64, 4), np.float32),
    np.zeros((64, 64, 4), np.int32),
], ids=["3-frames", "batched", "float32", "int32"])
def test_agent_act_rejects_bad_obs(agent, bad):
    with pytest.raises(ValueError, match="uint8"):
        agent.act(agent.initial_carry(), bad)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.float16])
def test_agent_act_names_the_dtype_it_was_given(agent, dtype):
    """Judged before conversion: jnp.asarray would turn float64 into float32 and name that."""
    with pytest.raises(ValueError, match=f"got {np.dtype(dtype).name}"):
        agent.act(agent.initial_carry(), np.zeros((64, 64, 4), dtype))
    with pytest.raises(ValueError, match=f"got {np.dtype(dtype).name}"):
        agent.act_batch(agent.initial_carry(2), np.zeros((2, 64, 64, 4), dtype))


@pytest.mark.parametrize("bad", [
    np.zeros((64, 64, 4), np.uint8),
    np.zeros((2, 64, 64, 3), np.uint8),
    np.zeros((2, 64, 64, 4), np.float32),
], ids=["unbatched", "3-frames", "float32"])
def test_agent_act_batch_rejects_bad_obs(agent, bad):
    with pytest.raises(ValueError, match="uint8"):
        agent.act_batch(agent.initial_carry(2), bad)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["trained", "reactive"])
def test_agent_act_equals_act_batch(agent, which):
    ag = agent if which == "trained" else _reactive_agent(agent)
    frames = _episode_frames(ag, jax.random.key(2), 8)
    carry = ag.initial_carry()
    actions, carries_in, carries_out = [], [], []
    for obs in frames:
        carries_in.append(carry)
        a, carry = ag.act(carry, obs)
        actions.append(int(a))
        carries_out.append(carry)
    batch_carry = jax.tree.map(lambda *xs: jnp.stack(xs), *carries_in)
    b_actions, b_carry = ag.act_batch(batch_carry, jnp.stack(frames))
    assert b_actions.shape == (len(frames),)
    np.testing.assert_array_equal(np.asarray(b_actions), actions)
    expected = jax.tree.map(lambda *xs: jnp.stack(xs), *carries_out)
    for got, want in zip(jax.tree.leaves(b_carry), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # a batch carry of the right shape comes from initial_carry(batch)
    assert [x.shape for x in jax.tree.leaves(ag.initial_carry(len(frames)))] == [x.shape for x in jax.tree.leaves(batch_carry)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["trained", "reactive"])
def test_agent_act_equals_evaluation_rollout(agent, which):
    """Agent.act drives the same real episodes as the evaluation rollout (rollout._episode): the same
    keys give the same actions step by step, hence the same returns and lengths."""
    ag = agent if which == "trained" else _reactive_agent(agent)
    cfg = ag.cfg
    num, max_steps = SMOKE.evolve.check_episodes, SMOKE.eval.max_steps  # the shapes the pipeline compiled
    key = jax.random.key(5)
    ref = jax.device_get(rollout.run_episodes(cfg, ag.params, key, num, max_steps))

    env = PixelCartPole()
    step_fn = jax.jit(lambda carry, obs: rollout.agent_step(cfg, ag.params, carry, obs)[:2])
    all_actions = []
    for e, k in enumerate(jax.random.split(key, num)):
        key_reset, key_run = jax.random.split(k)  # as rollout._episode splits its key
        obs, state = env.reset(key_reset, env.default_params)
        carry_a, carry_r = ag.initial_carry(), transition.initial_carry(cfg.transition)
        ret, length = 0.0, 0
        for key_t in jax.random.split(key_run, max_steps):
            a, carry_a = ag.act(carry_a, obs)
            a_r, carry_r = step_fn(carry_r, obs)
            assert int(a) == int(a_r)
            for x, y in zip(jax.tree.leaves(carry_a), jax.tree.leaves(carry_r)):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
            all_actions.append(int(a))
            key_step, _ = jax.random.split(key_t)
            obs, state, reward, terminated, truncated, _ = env.step(key_step, state, a, env.default_params)
            ret += float(reward)
            length += 1
            if bool(terminated) or bool(truncated):
                break
        assert ret == pytest.approx(float(ref["return"][e])), (e, ret, ref["return"])
        assert length == int(ref["length"][e])
    if which == "reactive":
        assert 0 < sum(all_actions) < len(all_actions)  # both actions taken: the comparison is not vacuous


@pytest.mark.slow
def test_evaluation_rollout_returns_the_visited_posteriors(agent):
    """rollout.evaluate(latents=True): the same episodes, plus the encoder posterior of every step
    the agent saw (valid exactly for the episode's steps); the first is the reset frame's."""
    cfg, num, steps = agent.cfg, 3, 40
    params = {**agent.params, "controller": jnp.zeros_like(agent.params["controller"])}  # always pushes left
    plain = rollout.evaluate(cfg, params, jax.random.key(7), num, steps)
    res = rollout.evaluate(cfg, params, jax.random.key(7), num, steps, latents=True)
    assert res["returns"] == plain["returns"] and res["env_steps"] == plain["env_steps"]
    assert 0 < res["env_steps"] < num * steps  # the episodes end inside the window: the mask's end is tested
    lat = res["latents"]
    assert lat["mean"].shape == lat["logvar"].shape == (num * steps, cfg.vae.latent) and lat["valid"].shape == (num * steps,)
    valid = lat["valid"].reshape(num, steps)
    assert int(valid.sum()) == res["env_steps"]
    for e in range(num):  # valid up to the episode's end, then not
        n = int(valid[e].sum())
        assert valid[e, :n].all() and not valid[e, n:].any()
    key_reset, _ = jax.random.split(jax.random.split(jax.random.fold_in(jax.random.key(7), 0), num)[0])
    obs, _ = PixelCartPole().reset(key_reset, PixelCartPole().default_params)
    mean0, logvar0 = vae.encode(cfg.vae, params["vae"], obs[None])
    np.testing.assert_allclose(lat["mean"][0], np.asarray(mean0[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lat["logvar"][0], np.asarray(logvar0[0]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# resume after a crash


@pytest.mark.slow
def test_resume_after_crash_in_transition_stage(finished, tmp_path, monkeypatch):
    out = tmp_path / "crashed"

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in the transition stage")

    with monkeypatch.context() as m:
        m.setattr(transition, "train", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            pipeline.run(SMOKE, out, progress=False)
    assert set(json.loads((out / "stages.json").read_text())) == {"collect", "vae", "encode_round1"}
    assert not (out / "summary.json").exists() and not (out / "controller.npy").exists()
    kept = {p: p.stat().st_mtime_ns for p in [*(out / "data").rglob("*"), *(out / "vae").rglob("*")] if p.is_file()}

    # finished stages are not rerun (round 2 still collects with the agent: that stage never ran)
    real_collect = collection.collect

    def collect_round2_only(key, num_episodes, policy=collection.RANDOM_POLICY, **kwargs):
        assert policy is not collection.RANDOM_POLICY, "the finished random collection was rerun"
        return real_collect(key, num_episodes, policy=policy, **kwargs)

    monkeypatch.setattr(collection, "collect", collect_round2_only)
    monkeypatch.setattr(vae, "train", _raise("vae.train"))
    summary = pipeline.run(SMOKE, out, progress=False)

    assert set(json.loads((out / "stages.json").read_text())) == set(STAGES)
    assert (out / "summary.json").exists() and (out / "controller.npy").exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert set(summary["wall_s"]) == set(STAGES) | {"total"}
    # same config and seed: the resumed run ends where the uninterrupted one did
    ref_dir, ref = finished
    np.testing.assert_array_equal(np.load(out / "controller.npy"), np.load(ref_dir / "controller.npy"))
    for k in ("real_return_mean", "real_return_std", "real_env_steps", "latent_kl"):
        assert summary[k] == ref[k], k


@pytest.mark.slow
def test_collection_policy_advances_m_with_the_executed_action():
    """With random actions mixed in, M must see the action taken, not the controller's choice."""
    cfg = dataclasses.replace(SMOKE, rounds=dataclasses.replace(SMOKE.rounds, action_noise=1.0))
    params = {
        "vae": vae.init(jax.random.key(0), cfg.vae),
        "transition": transition.init(jax.random.key(1), cfg.transition, cfg.vae.latent),
    }
    dims = 2 * (cfg.vae.latent + cfg.transition.hidden) + 2
    params["controller"] = jnp.zeros((dims,)).at[-1].set(1.0)  # greedy action: always 1
    policy = rollout.agent_policy(cfg)
    obs, _ = PixelCartPole().reset(jax.random.key(2))
    carry0 = policy.init_carry()
    z = vae.encode(cfg.vae, params["vae"], obs[None])[0][0]
    executed = set()
    for i in range(12):
        action, carry = policy.act(params, jax.random.key(10 + i), carry0, obs)
        expected, _ = transition.step(cfg.transition, params["transition"], carry0, z, action)
        np.testing.assert_allclose(np.asarray(carry[1]), np.asarray(expected[1]), rtol=1e-6, atol=1e-6)
        executed.add(int(action))
    assert executed == {0, 1}  # the random action did differ from the greedy one


def test_one_collection_program_serves_every_rounds_agent():
    """The agent's parameters are arguments of the collection program, not constants baked into
    it: two agents (two rounds) collect through one compiled program."""
    agents = [{"vae": vae.init(jax.random.key(k), SMOKE.vae),
               "transition": transition.init(jax.random.key(k + 1), SMOKE.transition, SMOKE.vae.latent),
               "controller": jax.random.normal(jax.random.key(k + 2), (2 * (SMOKE.vae.latent + SMOKE.transition.hidden) + 2,))}
              for k in (0, 10)]
    before = collection._collect_chunk_jit._cache_size()
    runs = [data.to_arrays(collection.collect(jax.random.key(3), 2, policy=rollout.agent_policy(SMOKE), max_steps=6,
                                        chunk_size=2, progress=False, params=p)) for p in agents]
    assert collection._collect_chunk_jit._cache_size() - before == 1
    assert not np.array_equal(runs[0]["action"], runs[1]["action"]) or len(runs[0]["action"]) != len(runs[1]["action"])


# ------------------------------------------------------------------------------------------------
# the verifier in the pipeline, and the ablation script on a finished run

def test_run_dir_written_before_a_config_field_existed_still_matches(finished, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(finished[0], out)
    saved = json.loads((out / "config.json").read_text())
    del saved["verifier"], saved["rounds"]["horizon"]
    (out / "config.json").write_text(json.dumps(saved))
    assert _same(pipeline.run(SMOKE, out, progress=False), finished[1])


@pytest.fixture(scope="module")
def with_verifier(tmp_path_factory) -> tuple[Path, dict]:
    cfg = dataclasses.replace(
        SMOKE, rounds=dataclasses.replace(SMOKE.rounds, rounds=1),
        verifier=dataclasses.replace(SMOKE.verifier, mode="weight", seq_len=8,
                                     train=dataclasses.replace(SMOKE.verifier.train, steps=20, batch=4, chunk=10)),
    )
    out = tmp_path_factory.mktemp("pipeline") / "verifier"
    return out, pipeline.run(cfg, out, progress=False)


def test_pipeline_trains_the_verifier_when_it_is_on(with_verifier):
    out, summary = with_verifier
    stages = json.loads((out / "stages.json").read_text())
    assert "verifier" in stages and (out / "verifier" / "checkpoints").is_dir()
    assert math.isfinite(summary["real_return_mean"])




@pytest.mark.slow
def test_verifier_ablation_script(with_verifier, tmp_path, monkeypatch):
    import sys

    mod = load_experiment("verifier_ablation", monkeypatch)
    run = tmp_path / "run"
    shutil.copytree(with_verifier[0], run)
    (run / "ablation").mkdir()
    old = {"mode": "off", "tau": 1.0, "horizon": 4, "generations": 1, "real_return_mean": 7.0, "real_return_std": 0.0,
           "real_return_min": 7.0, "dream_real_corr": None, "best_check": 7.0, "real_env_steps_checks": 0, "seed": 0}
    (run / "ablation" / "cells.jsonl").write_text(json.dumps(old) + "\n")  # a cell stored before grounding existed
    args = ["verifier_ablation.py", str(run), "--modes", "off", "cutoff", "--taus", "1.0", "1.3", "--horizons", "4",
            "--groundings", "0.0", "0.5", "--cma-seeds", "0", "1", "--generations", "1", "--eval-episodes", "2",
            "--held-out-episodes", "4", "2", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", args)
    mod.main()
    md = (tmp_path / "out" / "ablation.md").read_text()
    for cell in ("| off | 1.0 | 4 | 0.0 | s0: 7.0 +- 0.0, s0/c0: ", "| cutoff | 1.3 | 4 | 0.0 | s0/c0: ",
                 "| off | 1.0 | 4 | 0.5 | s0/c0: "):
        assert cell in md  # the old cell (one fixed key, before grounding existed) is kept beside the new ones
    assert "| off | 4 | sweep | 8 |" in md and "| cutoff | 4 | sweep | 8 |" in md  # one program per pair
    assert (tmp_path / "out" / "drift.png").stat().st_size > 0
    result = json.loads((tmp_path / "out" / "ablation.json").read_text())[0]
    assert result["report"]["drift"]["agent"]["latent_mse"][0] == 0.0
    assert len((run / "ablation" / "cells.jsonl").read_text().splitlines()) == 1 + 2 * 8
    sweep_dirs = sorted((run / "ablation").glob("sweep_off_h4_*"))
    checks = [json.loads(line) for line in (sweep_dirs[0] / "evolve.jsonl").read_text().splitlines()]
    assert len(checks) == 8 and all(c["grounding_states"] > 0 for c in checks)  # the checks' states became pools
    monkeypatch.setattr(mod, "_pair", _raise("_pair"))  # a rerun does no cell twice
    mod.main()


@pytest.mark.slow
def test_mitigations_script(with_verifier, tmp_path, monkeypatch):
    import sys

    mod = load_experiment("mitigations", monkeypatch)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        shutil.copytree(with_verifier[0], run)
    monkeypatch.setattr(sys, "argv", ["mitigations.py", *map(str, runs), "--steps", "3", "--dropout", "0.1", "0.2",
                                      "--z-penalty", "0.5", "--contrastive", "0.1", "--out", str(tmp_path / "out")])
    mod.main()
    md = (tmp_path / "out" / "mitigations.md").read_text()
    for name in ("plain", "input_dropout=0.1", "input_dropout=0.2", "z_penalty=0.5", "contrastive=0.1"):
        assert f"| {name} | random |" in md
    assert "| z_penalty=0.5 | agent |" in md and "of 2 |" in md  # the summary against plain over both runs
    saved = json.loads((tmp_path / "out" / "mitigations.json").read_text())
    assert [s["seed"] for s in saved["seeds"]] == [SMOKE.seed] * 2
    assert (runs[1] / "mitigations" / "input_dropout_0.2" / "checkpoints").is_dir()


@pytest.mark.parametrize("share", ["1.5", "0.2"])  # out of [0, 1]; 0.2 of the smoke preset's 2 rollouts is no dream
def test_verifier_ablation_rejects_a_bad_grounding_before_any_work(with_verifier, tmp_path, monkeypatch, capsys, share):
    import sys

    mod = load_experiment("verifier_ablation", monkeypatch)
    monkeypatch.setattr(mod, "run_seed", _raise("run_seed"))
    monkeypatch.setattr(sys, "argv", ["verifier_ablation.py", str(with_verifier[0]), "--groundings", share,
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 2 and "--groundings" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fork_script_redoes_only_the_rounds_from_its_search(smoke_run, tmp_path, monkeypatch):
    """experiments/fork.py (the screen and the verdict of docs/RESULTS.md section 13 run on it): a
    finished run carried on from round 2's search with no change is that run again; with a later
    round's setting changed, every stage before round 2's search is the original's record and the
    search is redone; a field that feeds an earlier stage is refused."""
    mod = load_experiment("fork", monkeypatch)
    runs = tmp_path / "runs"
    shutil.copytree(smoke_run[0], runs / "smoke-s0")
    base = ["--runs", str(runs), "--seeds", "0", "--preset", "smoke", "--at", "2"]
    assert mod.main([*base, "--forks", str(tmp_path / "same"), "--out", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same" / "smoke-s0" / "summary.json").read_text())
    for k in ("real_return_mean", "real_return_std", "real_env_steps", "agent_round", "imagined_steps",
              "learning_curve"):
        assert same[k] == smoke_run[1][k], k
    assert mod.main([*base, "--set", "rounds.generations=3", "--forks", str(tmp_path / "g3"),
                     "--out", str(tmp_path / "g3.json")]) == 0
    old, new = (json.loads((d / "stages.json").read_text()) for d in (smoke_run[0], tmp_path / "g3" / "smoke-s0"))
    for name in ("collect", "vae", "encode_round1", "transition", "evolve_round1", "collect_round2", "encode_round2",
                 "transition_round2"):
        assert new[name] == old[name], name
    assert (old["evolve_round2"]["generations"], new["evolve_round2"]["generations"]) == (2, 3)
    assert run_dir.read_config(tmp_path / "g3" / "smoke-s0").rounds.generations == 3
    with pytest.raises(SystemExit, match="changes a stage before the fork"):
        mod.main([*base, "--set", "vae.latent=4", "--forks", str(tmp_path / "v"), "--out", str(tmp_path / "v.json")])
