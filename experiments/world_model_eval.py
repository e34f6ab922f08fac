"""Held-out quality of a run's V and M on fresh random episodes (never seen in training).

    python experiments/world_model_eval.py runs/cpu [--episodes 200] [--seed 999]

Prints and writes RUN/world_model_eval.json with:
  vae_mse_per_pixel          reconstruction MSE per pixel (from the posterior mean), pixels in [0, 1]
  latent_nll                 M's one-step -log p(z_{t+1} | h_{t+1}) in nats (summed over z dims),
                             teacher-forced along the held-out episodes, z = posterior means
  done_auc                   ROC AUC of M's done logit for "this action ended the episode"
  reward_mae                 mean |predicted reward - real reward|
The round-1 M (trained on random data only) and the final M are both reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import run_dir, stats
from wm_jax.models import transition, vae
from wm_jax.search import drift
from wm_jax.store import collection, data
from wm_jax.config import Config


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of scores for boolean labels (ties count half)."""
    labels = labels.astype(bool)
    return stats.auc(scores[labels], scores[~labels])


def m_metrics(cfg: Config, m_params, rows: dict) -> dict:
    """Teacher-forced one-step metrics on per-row arrays (`transition.training_arrays`), all episodes
    in one batch padded to the longest."""
    ep = drift.pad_episodes(rows)
    steps = np.arange(ep["action"].shape[1])[None, :]
    valid = steps < ep["length"][:, None]
    next_valid = steps < ep["length"][:, None] - 1
    pred = transition.observe(cfg.transition, m_params, jnp.asarray(ep["mean"]), jnp.asarray(ep["action"]),
                              jnp.zeros(valid.shape, bool))
    z_next = jnp.asarray(np.roll(ep["mean"], -1, axis=1))  # the last step of each episode is masked
    nll = np.asarray(transition.latent_nll(pred, z_next))
    done_logit = np.asarray(pred.done_logit)
    reward = np.asarray(pred.reward)
    return {
        "latent_nll": float(nll[next_valid].mean()),
        "done_auc": auc(done_logit[valid], ep["done"][valid]),
        "reward_mae": float(np.abs(reward - ep["reward"])[valid].mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=999)
    args = p.parse_args()
    run = Path(args.run_dir)
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    ds = collection.collect(jax.random.key(args.seed), args.episodes, progress=False)
    arrays = data.to_arrays(ds)
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    vae_params = vae.load(cfg, run / "vae")
    mean, logvar = vae.encode_all(cfg.vae, vae_params, arrays["frame"], index.stack_rows)
    rows = transition.training_arrays(mean, logvar, arrays, index)
    recon = []
    dec = jax.jit(lambda z: vae.decode(cfg.vae, vae_params, z))
    for lo in range(0, len(mean), 1024):  # (named apart from `rows`, the per-row arrays M is scored on)
        chunk = jnp.arange(lo, min(lo + 1024, len(mean)))
        x = data.stacks(jnp.asarray(arrays["frame"]), jnp.asarray(index.stack_rows), chunk)
        recon.append(np.asarray(jnp.mean(jnp.square(dec(jnp.asarray(mean[lo : lo + 1024])) - vae.to_float(x)), axis=(1, 2, 3))))
    result = {
        "run_dir": str(run),
        "held_out_episodes": args.episodes,
        "held_out_seed": args.seed,
        "held_out_rows": int(len(mean)),
        "vae_mse_per_pixel": float(np.mean(np.concatenate(recon))),
        "m_round1": m_metrics(cfg, transition.load(cfg, run / "transition"), rows),
    }
    # the last round that ran (a run skips its later rounds once its agent is solved: evolve.stop_at)
    last = max((r for r in range(2, cfg.rounds.rounds + 1) if (run / f"transition_round{r}").is_dir()), default=None)
    if last is not None:
        m_final = transition.load(run_dir.round_config(cfg, run_dir.read_stages(run), last), run / f"transition_round{last}")
        result["m_final"] = m_metrics(cfg, m_final, rows)
    for name in ("vae", "transition"):
        stage = json.loads((run / "stages.json").read_text()).get(name, {})
        result[f"{name}_train_steps_per_s"] = stage.get("steps_per_s")
    (run / "world_model_eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
