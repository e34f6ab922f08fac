"""Tests for `wm-jax report` (wm_jax.report): many seeds' run directories as a distribution."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from wm_jax import cli, report, run_dir, stages
from wm_jax.presets import get_preset

pytest.importorskip("rliable")  # the analysis extra, which the test extra includes


def _run(root: Path, seed: int, final: float, steps: int, checks: list[tuple[int, float, int]], round_: int = 2,
         preset: str = "frugal", cfg=None) -> Path:
    """A finished run directory as far as the report reads it: config.json and summary.json with a
    learning curve of the random data's collection, `checks` (steps, return, episodes) in round
    `round_`, and the final evaluation."""
    run = root / f"{preset}-s{seed}"
    run.mkdir(parents=True)
    run_dir.write_config(run, cfg or get_preset(preset, seed))
    curve = [{"source": "collect", "round": 1, "episodes": 200, "real_env_steps": 4000, "real_return": 20.0}]
    curve += [{"source": "check", "round": round_, "episodes": eps, "real_env_steps": s, "real_return": r}
              for s, r, eps in checks]
    curve += [{"source": "evaluate", "episodes": 100, "real_env_steps": steps, "real_return": final}]
    summary = {"seed": seed, "preset": preset, "real_return_mean": final, "real_return_std": 1.0,
               "real_return_min": final - 3, "solved": final >= 475.0, "real_env_steps_training": steps,
               "agent_round": round_, "learning_curve": curve, "device": "cpu (test)",
               "wall_s": {"collect": 60.0, "vae": 120.0, "total": 181.0}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _runs(root: Path, finals: list[float], steps: list[int] | None = None) -> list[Path]:
    steps = steps or [15_000 + 1_000 * i for i in range(len(finals))]
    return [_run(root, 100 + i, f, s, [(s - 3_000, 300.0, 4), (s - 1_000, min(f + 10.0, 500.0), 8)])
            for i, (f, s) in enumerate(zip(finals, steps))]


def test_aggregates_are_over_seeds_median_included(tmp_path):
    """IQM as scipy's trim_mean at 25%, the median of the seeds (not rliable's aggregate_median,
    which for one task is the mean), the mean; each inside its interval; solved counted at 475;
    steps within the preset's budget counted."""
    finals = [500.0, 500.0, 499.0, 120.0, 480.0, 300.0, 498.0, 495.0]
    steps = [12_000, 14_000, 16_000, 18_000, 19_000, 21_000, 22_000, 25_000]
    _runs(tmp_path, finals, steps)
    result = report.report([tmp_path], reps=500)
    agg = result["aggregate"]
    ret = agg["return"]
    assert ret["iqm"] == pytest.approx(scipy_stats.trim_mean(finals, 0.25))
    assert ret["median"] == pytest.approx(np.median(finals)) and ret["mean"] == pytest.approx(np.mean(finals))
    assert ret["median"] != pytest.approx(ret["mean"])
    for key in ("iqm", "median", "mean"):
        lo, hi = ret[f"{key}_ci95"]
        assert lo <= ret[key] <= hi and lo < hi
    assert agg["solved"] == 6 and agg["judged"] == 8
    assert agg["training_steps"]["max"] == 25_000 and agg["training_steps"]["goal"] == 20_000
    assert agg["training_steps"]["within_goal"] == 5
    assert [r["seed"] for r in result["rows"]] == list(range(100, 108))
    gaps = [r["selection_gap"] for r in result["rows"]]
    assert gaps == pytest.approx([max(300.0, min(f + 10.0, 500.0)) - f for f in finals])  # the best check
    assert [r["kept_check_episodes"] for r in result["rows"]] == [8, 8, 8, 4, 8, 8, 8, 8]
    assert agg["stage_minutes"]["median"] == pytest.approx(3.0)  # 60 + 120 s of stages; "total" is not a stage


def test_iqm_matches_scipy_and_ignores_nans():
    rng = np.random.RandomState(0)
    for n in (1, 2, 3, 4, 7, 16):
        v = rng.randn(n)
        assert report.iqm(v) == pytest.approx(scipy_stats.trim_mean(v, 0.25))
    cols = np.array([[1.0, np.nan, np.nan], [2.0, np.nan, 4.0], [3.0, 7.0, 5.0], [100.0, np.nan, 6.0]])
    got = report.iqm(cols)
    assert got[0] == pytest.approx(2.5) and got[1] == pytest.approx(7.0) and got[2] == pytest.approx(5.0)
    assert np.isnan(report.iqm(np.full((3, 1), np.nan)))[0]


def test_intervals_are_the_same_for_the_same_seed_and_leave_numpys_generator_alone():
    """rliable 1.2 draws from NumPy's global generator whatever random_state says: the report seeds it
    for the estimate and gives the caller's state back."""
    values = np.arange(16.0) ** 1.5
    np.random.seed(7)
    expected_next = np.random.rand()
    np.random.seed(7)
    a, b = report.interval(values, reps=300), report.interval(values, reps=300)
    assert a == b
    assert np.random.rand() == expected_next
    assert report.interval(values, reps=300, seed=1) != a


def test_the_curve_holds_each_seeds_last_value_and_is_nan_before_its_first():
    grid = np.array([0.0, 5.0, 10.0, 15.0, 30.0])
    at = report.curve_at([[(5, 1.0), (10, 2.0)], [(12, 9.0)]], grid)
    np.testing.assert_array_equal(at[0], [np.nan, 1.0, 2.0, 2.0, 2.0])
    np.testing.assert_array_equal(at[1], [np.nan, np.nan, np.nan, 9.0, 9.0])


def test_kept_check_is_the_best_of_the_agents_round(tmp_path):
    run = _run(tmp_path, 3, 400.0, 20_000, [(15_000, 480.0, 4), (17_000, 410.0, 4), (19_000, 480.0, 8)], round_=3)
    row = report.row(run)
    assert row["kept_check"] == 480.0 and row["kept_check_episodes"] == 4  # the first among equals, as the search
    assert row["selection_gap"] == pytest.approx(80.0) and row["agent_round"] == 3
    assert row["curve"][-1] == (20_000, 400.0)  # the final evaluation closes the curve


def test_runs_of_another_recipe_or_a_seed_twice_are_refused_in_one_line(tmp_path):
    _runs(tmp_path / "a", [500.0, 490.0])
    cfg = get_preset("frugal", 300)
    _run(tmp_path / "a", 300, 480.0, 15_000, [], cfg=dataclasses.replace(cfg, rounds=dataclasses.replace(
        cfg.rounds, budget=30_000)))
    with pytest.raises(report.ReportError, match=r"another recipe .*rounds\.budget: 30000 against 20000"):
        report.report([tmp_path / "a"])
    _runs(tmp_path / "b", [500.0])
    _runs(tmp_path / "c", [480.0])
    with pytest.raises(report.ReportError, match=r"seeds \[100\] appear twice"):
        report.report([tmp_path / "b", tmp_path / "c"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="no finished run directory"):
        report.report([tmp_path / "empty"])
    with pytest.raises(report.ReportError, match="named twice"):
        report.report([tmp_path / "b" / "frugal-s100", tmp_path / "b"])
    with pytest.raises(report.ReportError, match="no such directory"):
        report.report([tmp_path / "nowhere"])


def test_the_command_prints_the_table_and_writes_json_and_plots(tmp_path, capsys):
    _runs(tmp_path / "runs", [500.0, 480.0, 300.0, 499.0])
    out = tmp_path / "report.json"
    code = cli.main(["report", str(tmp_path / "runs"), "--json", str(out), "--plots", str(tmp_path / "fig"),
                     "--reps", "200"])
    text = capsys.readouterr().out
    assert code == 0
    assert "4 runs of CartPole-v1 (threshold 475.0) on cpu (test)" in text and "solved: 3 of 4" in text
    assert text.count("\n10") == 4  # one row per seed (100-103)
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 4 and saved["aggregate"]["solved"] == 3 and saved["rows"][0]["curve"]
    for name in ("learning_curves.png", "solved_fraction.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_the_analysis_extra_the_command_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    _runs(tmp_path, [500.0, 480.0])
    monkeypatch.setitem(sys.modules, "rliable", None)  # `import rliable` raises ImportError
    code = cli.main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'wm_jax[analysis]'" in err


def test_a_bad_reps_count_is_refused_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "runs", "--reps", "5"])
    assert e.value.code == 2 and "--reps" in capsys.readouterr().err


def test_the_cpu_is_named_with_its_vector_extensions():
    name = stages.cpu_name()
    assert "cores" in name
    if Path("/proc/cpuinfo").is_file() and "avx" in Path("/proc/cpuinfo").read_text():
        assert "AVX" in name
    assert stages.device_name().startswith("cpu (" + name) or not stages.device_name().startswith("cpu")


@pytest.mark.parametrize("content", ['{"seed": 1}', "[1]", '{"seed": "x", "learning_curve": []}'])
def test_a_summary_without_a_finished_runs_fields_is_one_line(tmp_path, capsys, content):
    _runs(tmp_path, [500.0, 480.0])
    (tmp_path / "frugal-s101" / "summary.json").write_text(content)
    code = cli.main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "frugal-s101/summary.json" in err and "Traceback" not in err


def test_unfinished_runs_are_named_and_left_out(tmp_path):
    _runs(tmp_path, [500.0, 480.0, 300.0])
    (tmp_path / "frugal-s102" / "summary.json").unlink()
    result = report.report([tmp_path], reps=200)
    assert [r["seed"] for r in result["rows"]] == [100, 101]
    assert result["unfinished"] == [str(tmp_path / "frugal-s102")]
    assert "left out, unfinished (no summary.json)" in report.text(result)


def test_bands_agree_with_a_plain_bootstrap_over_seeds():
    """The solved fraction's curve from `bands` ends at solved / n and its band holds it; an IQM
    interval is close to one from resampling seeds with NumPy directly."""
    steps = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    solved = np.array([True, True, False, True, False])
    grid = np.array([0.0, 25.0, 60.0])
    point, band = report.bands(lambda idx: ((steps[idx, None] <= grid) & solved[idx, None]).mean(0), 5, 2000)
    assert point.tolist() == [0.0, 0.4, 0.6] and (band[0] <= point).all() and (point <= band[1]).all()
    values = np.random.RandomState(1).gamma(2.0, 50.0, size=24)
    ours = report.interval(values, reps=4000)["iqm_ci95"]
    draws = np.random.RandomState(2).randint(0, values.size, size=(4000, values.size))
    plain = np.percentile([report.iqm(values[d]) for d in draws], [2.5, 97.5])
    assert ours == pytest.approx(plain, rel=0.08)


def test_probability_of_improvement_is_mann_whitneys_with_an_interval_seeds_never_paired():
    """P(X > Y) over every (x, y) pair of seeds, ties half (rliable's probability_of_improvement);
    the interval resamples each side apart, and different counts of seeds are allowed."""
    x, y = [500.0, 480.0, 490.0, 300.0], [450.0, 480.0, 200.0]
    pairs = [(a > b) + 0.5 * (a == b) for a in x for b in y]
    got = report.improvement(x, y, reps=500)
    assert got["p"] == pytest.approx(np.mean(pairs)) and got["n"] == [4, 3]
    lo, hi = got["p_ci95"]
    assert lo <= got["p"] <= hi and lo < hi
    assert report.improvement([1.0, 2.0], [1.0, 2.0], reps=200)["p"] == 0.5
    assert report.improvement([9.0, 8.0], [1.0, 2.0], reps=200)["p_ci95"] == [1.0, 1.0]


def test_against_prints_both_reports_and_the_comparison_and_draws_the_profile(tmp_path, capsys):
    a = _runs(tmp_path / "a", [500.0, 499.0, 498.0, 490.0], [12_000, 13_000, 14_000, 15_000])
    b = _runs(tmp_path / "b", [480.0, 300.0, 499.0], [18_000, 21_000, 19_000])
    code = cli.main(["report", str(tmp_path / "a"), "--against", str(tmp_path / "b"), "--names", "new", "old",
                     "--reps", "200", "--json", str(tmp_path / "cmp.json"), "--plots", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0 and len(a) == 4 and len(b) == 3
    assert "P(new scores above old) = " in out and "P(new spends fewer training steps than old) = 1.00" in out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["names"] == ["new", "old"] and len(saved["new"]["rows"]) == 4 and len(saved["old"]["rows"]) == 3
    assert saved["comparison"]["fewer_steps"]["p"] == 1.0
    for png in ("performance_profile.png", "solved_fraction.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_against_refuses_another_task_and_names_that_are_not_two(tmp_path, capsys):
    _runs(tmp_path / "a", [500.0, 490.0])
    acro = dataclasses.replace(get_preset("frugal"), eval=dataclasses.replace(get_preset("frugal").eval, solved_at=-100.0))
    _run(tmp_path / "b", 7, -120.0, 20_000, [(19_000, -150.0, 4)], cfg=acro)
    for argv, needle in ((["--against", str(tmp_path / "b")], "runs of other tasks"),
                         (["--against", str(tmp_path / "a"), "--names", "x", "x"], "not 'x' twice"),
                         (["--names", "x", "y"], "give --against RUNS too")):
        code = cli.main(["report", str(tmp_path / "a"), "--reps", "100", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (argv, err)
