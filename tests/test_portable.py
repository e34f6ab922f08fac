"""What leaves a run directory: exported agents (safetensors + config.json), dream videos and
TensorBoard event files. All of it reads the session's finished smoke run (conftest.smoke_run),
whose pipeline ran with the TensorBoard writer on."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from wm_jax import cli, commands, logs, pretrained, run_dir, video
from wm_jax.models import verifier
from wm_jax.search import rollout
from wm_jax.store import data
from wm_jax.agent import Agent, evaluation_key
from wm_jax.envs.cartpole import PixelCartPole


@pytest.fixture(scope="module")
def agent(smoke_run) -> Agent:
    return Agent.load(smoke_run[0])


@pytest.fixture(scope="module")
def exported(agent, tmp_path_factory) -> Path:
    return agent.save_pretrained(tmp_path_factory.mktemp("export") / "agent")


def _frames(n: int) -> list[np.ndarray]:
    """n real observations of pixel CartPole under alternating actions."""
    env = PixelCartPole()
    obs, state = env.reset(jax.random.key(3))
    out = []
    for t in range(n):
        out.append(np.asarray(obs))
        obs, state, *_ = env.step(jax.random.key(t), state, t % 2)
    return out


# portable agents


def test_export_round_trip_gives_identical_parameters_and_actions(agent, exported):
    files = sorted(p.name for p in exported.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    loaded = Agent.from_pretrained(exported)
    assert loaded.cfg == agent.cfg and loaded.verifier is None
    a, b = jax.tree_util.tree_flatten_with_path(agent.params)[0], jax.tree_util.tree_flatten_with_path(loaded.params)[0]
    assert [p for p, _ in a] == [p for p, _ in b]
    for (_, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ca, cb = agent.initial_carry(), loaded.initial_carry()
    for obs in _frames(12):
        act_a, ca = agent.act(ca, obs)
        act_b, cb = loaded.act(cb, obs)
        assert int(act_a) == int(act_b)
        for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    card = (exported / "README.md").read_text()
    assert "smoke preset, seed 0" in card and "real return, mean" in card and "Agent.from_pretrained" in card


def test_exported_agent_evaluates_as_the_run_did(smoke_run, exported):
    """The run's own evaluation key: the exported agent reproduces summary.json's returns and steps."""
    summary = smoke_run[1]
    ev = Agent.from_pretrained(exported).evaluate()
    assert ev["return_mean"] == summary["real_return_mean"]
    assert ev["return_min"] == summary["real_return_min"]
    assert ev["env_steps"] == summary["real_env_steps"] - summary["real_env_steps_training"]
    assert ev["latent_kl"] == pytest.approx(summary["latent_kl"], rel=1e-6)


def test_export_with_a_verifier_keeps_it(agent, tmp_path):
    cfg = dataclasses.replace(agent.cfg, verifier=dataclasses.replace(agent.cfg.verifier, mode="weight"))
    k_params = verifier.init(jax.random.key(1), cfg.verifier, cfg.vae.latent, cfg.transition.hidden)
    Agent(cfg, agent.params, k_params, {"real_return_mean": 1.0}).save_pretrained(tmp_path / "k")
    loaded = Agent.from_pretrained(tmp_path / "k")
    assert loaded.cfg.verifier.mode == "weight" and loaded.card["has_verifier"] is True
    assert jax.tree.structure(k_params) == jax.tree.structure(loaded.verifier)
    for x, y in zip(jax.tree.leaves(k_params), jax.tree.leaves(loaded.verifier)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def _record_weights_hash(folder: Path) -> None:
    """config.json records the weights file as it is now, and hashes itself again (a folder that
    passes both hashes, whose damage only a deeper check sees)."""
    meta = json.loads((folder / pretrained.CONFIG).read_text())
    meta["sha256"][pretrained.WEIGHTS] = data.sha256_file(folder / pretrained.WEIGHTS)
    meta["config_sha256"] = pretrained.config_digest(meta)
    (folder / pretrained.CONFIG).write_text(json.dumps(meta))


def _rewrite_weights(folder: Path, change) -> None:
    """Replace model.safetensors by change(tensors), with its metadata, and record its new hash."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(folder / pretrained.WEIGHTS), "np") as f:
        metadata = f.metadata()
    tensors = change(load_file(str(folder / pretrained.WEIGHTS)))
    save_file(tensors, str(folder / pretrained.WEIGHTS), metadata=metadata)
    _record_weights_hash(folder)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_version(folder: Path) -> None:
    meta = json.loads((folder / pretrained.CONFIG).read_text())
    meta["format_version"] = pretrained.FORMAT_VERSION + 1
    (folder / pretrained.CONFIG).write_text(json.dumps(meta))


def _drop_tensor(tensors):
    return {k: v for k, v in tensors.items() if k != "controller"}


def _reshape_tensor(tensors):
    name = next(k for k in tensors if k.startswith("transition/"))
    return {**tensors, name: np.zeros((3, 3), tensors[name].dtype)}


def _truncate(folder: Path) -> None:
    """A weights file cut short, with config.json recording the cut file's hash (damage that only
    the safetensors reader sees)."""
    path = folder / pretrained.WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    _record_weights_hash(folder)


DAMAGE = {
    "no config.json": (lambda f: (f / pretrained.CONFIG).unlink(), "config.json is missing"),
    "config.json not JSON": (lambda f: (f / pretrained.CONFIG).write_text("{not json"), "config.json is damaged"),
    "no weights": (lambda f: (f / pretrained.WEIGHTS).unlink(), "model.safetensors is missing"),
    "weights changed": (lambda f: _flip_byte(f / pretrained.WEIGHTS), "SHA-256 differs"),
    "weights truncated": (_truncate, "model.safetensors is damaged"),
    "another layout version": (_set_version, "layout version"),
    "a tensor missing": (lambda f: _rewrite_weights(f, _drop_tensor), "another layout"),
    "a tensor of another shape": (lambda f: _rewrite_weights(f, _reshape_tensor), "this wm_jax builds"),
}



@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_export_fails_with_one_line_naming_the_problem(exported, tmp_path, capsys, case):
    damage, words = DAMAGE[case]
    folder = _copy(exported, tmp_path)
    damage(folder)
    with pytest.raises(pretrained.PretrainedError) as info:
        Agent.from_pretrained(folder)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert cli.main(["evaluate", str(folder), "--episodes", "1"]) == commands.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_export_refuses_a_folder_that_is_not_an_export_and_replaces_an_earlier_one(agent, exported, smoke_run,
                                                                                   tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    hf = tmp_path / "hf"  # another library's model folder: a config.json of its own
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    run = smoke_run[0]  # a run directory has a config.json too
    before = sorted(p.name for p in run.iterdir())
    for folder in (other, hf, run):
        with pytest.raises(pretrained.PretrainedError, match="not an exported wm_jax agent"):
            agent.save_pretrained(folder)
    assert (other / "notes.txt").read_text() == "mine" and (hf / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert sorted(p.name for p in run.iterdir()) == before
    again = agent.save_pretrained(_copy(exported, tmp_path))  # an earlier export is replaced whole
    assert sorted(p.name for p in again.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_export_command(smoke_run, tmp_path, capsys):
    assert cli.main(["export", str(smoke_run[0]), "--out", str(tmp_path / "a")]) == 0
    assert "exported to" in capsys.readouterr().out
    assert Agent.from_pretrained(tmp_path / "a").cfg.preset == "smoke"
    assert cli.main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == commands.EXIT_INPUT
    assert "no such folder" in capsys.readouterr().err


# dream videos


def _gif_frames(path: Path) -> tuple[int, tuple[int, int]]:
    with Image.open(path) as im:
        assert im.format == "GIF" and (im.is_animated or im.n_frames == 1)
        return im.n_frames, im.size


def test_the_pipeline_writes_the_episode_video(smoke_run):
    """episode.gif: one frame per step of the episode the strip shows (as long as it lasted)."""
    out = smoke_run[0]
    cfg, params = Agent.load(out).cfg, Agent.load(out).params
    k_episode, _ = jax.random.split(jax.random.fold_in(run_dir.run_keys(cfg.seed)["evaluate"], 99))
    rec = rollout.open_loop(cfg, {**params, "verifier": None}, k_episode, cfg.eval.max_steps)
    frames, size = _gif_frames(out / "episode.gif")
    assert frames == int(rec["valid"].sum()) >= 1
    assert size == (3 * 64 * video.SCALE + 4 * video.PAD,
                    video.TITLE_H + 64 * video.SCALE + video.CAPTION_H + video.PLOT_H + 2 * video.PAD)


@pytest.mark.slow
def test_video_command_writes_every_episode(exported, tmp_path, capsys):
    """`wm-jax video` on an exported agent: as many frames as the episodes lasted, a readable GIF."""
    out = tmp_path / "v.gif"
    assert cli.main(["video", str(exported), "--episodes", "2", "--max-steps", "12", "--out", str(out)]) == 0
    agent = Agent.from_pretrained(exported)
    key = jax.random.fold_in(evaluation_key(agent.cfg.seed), 1000)
    lengths = [int(rollout.open_loop(agent.cfg, {**agent.params, "verifier": None}, jax.random.fold_in(key, i),
                                     12)["valid"].sum()) for i in range(2)]
    assert _gif_frames(out)[0] == sum(lengths)
    assert f"{sum(lengths)} frames" in capsys.readouterr().out
    assert cli.main(["video", str(exported), "--out", str(tmp_path / "v.mp4")]) == commands.EXIT_INPUT
    capsys.readouterr()
    # every step's frames are held until written: no more steps than an episode can have
    assert cli.main(["video", str(exported), "--max-steps", "1000000000", "--out", str(out)]) == commands.EXIT_INPUT
    assert "--max-steps must be at most 500 steps" in capsys.readouterr().err


def test_render_marks_where_the_dream_ended():
    steps = 6
    rec = {"real": np.zeros((steps, 64, 64), np.uint8), "recon": np.zeros((steps, 64, 64)),
           "dreamed": np.zeros((steps, 64, 64)), "action": np.zeros(steps, np.int32), "reward": np.ones(steps),
           "valid": np.array([1, 1, 1, 1, 1, 0.0]), "dream_reward": np.ones(steps),
           "dream_p_done": np.array([0, 0.9, 0, 0, 0, 0.0]), "pixel_error": np.linspace(0, 1, steps),
           "dream_confidence": np.full(steps, 0.5)}
    frames = video.render(rec)
    assert frames.shape[0] == 5 and frames.dtype == np.uint8  # the episode's length, not the scan's
    size = 64 * video.SCALE
    x0 = 2 * (size + video.PAD) + video.PAD

    def dream_panel(t: int) -> np.ndarray:
        return frames[t, video.TITLE_H:video.TITLE_H + size, x0:x0 + size]

    assert dream_panel(1).max() == 0 and dream_panel(2).min() > 100  # dimmed after the step p(done) > 0.5
    with pytest.raises(ValueError, match="gif"):
        video.write(Path("x.png"), frames)


# TensorBoard


def _events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every event file under logdir (TFRecord framing, tensorboardX's protobufs)."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append((event.step, v.simple_value))
    return tags


def test_tensorboard_event_files_of_the_smoke_run_hold_every_record(smoke_run):
    out = smoke_run[0]
    for stage in ("vae", "transition", "transition_round2"):
        rows = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
        tags = _events(out / stage / "tensorboard")
        assert "metrics/loss" in tags
        assert tags["metrics/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    for r in (1, 2):
        checks = [json.loads(x) for x in (out / f"evolve_round{r}" / "evolve.jsonl").read_text().splitlines()]
        tags = _events(out / f"evolve_round{r}" / "tensorboard")
        assert {"generations/dream_mean", "evolve/real_return", "evolve/dream_return"} <= set(tags)
        assert tags["evolve/real_return"] == [(c["generation"], pytest.approx(c["real_return"])) for c in checks]


def test_log_writers_are_named():
    with pytest.raises(ValueError, match="unknown log writer"):
        logs.use("wandb")
