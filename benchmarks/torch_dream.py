"""The dream of wm_jax.search.dream.score_population written as a batched PyTorch eager loop, for a
side-by-side speed comparison on the same machine (`dream_throughput.py --compare-torch`).

    pip install -e '.[torch]'           # the CPU build of PyTorch (optional extra)
    python benchmarks/torch_dream.py --sizes 64x16,256x64

The same work per step as the JAX dream: each of P candidates (a linear controller on [z, h], its
own weights, a batched matmul) picks actions for its R dreams; M is an `nn.LSTMCell` (hidden 256)
on [z, one-hot action] with a Gaussian or mixture latent head and reward and done heads; z' is
sampled at temperature tau with the same noise for every candidate (common random numbers); Ha's
done rule masks the steps after p_done > 0.5. fp32, or bf16 with `torch.autocast` (the one line a
PyTorch user adds). This is a baseline for timing, not part of the library: random weights, as in
dream_throughput.py (the work does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

ACTIONS = 2


class Dream(nn.Module):
    def __init__(self, latent: int = 64, hidden: int = 256, components: int = 1):
        super().__init__()
        self.latent, self.components = latent, components
        self.cell = nn.LSTMCell(latent + ACTIONS, hidden)
        per_dim = 2 if components == 1 else 3 * components
        self.latent_head = nn.Linear(hidden, latent * per_dim)
        self.reward_head = nn.Linear(hidden, 1)
        self.done_head = nn.Linear(hidden, 1)

    @torch.inference_mode()
    def forward(self, ctrl_w, ctrl_b, starts, noise, gumbel, tau: float = 1.0):
        """ctrl_w [P, latent + hidden, 2], ctrl_b [P, 2]; starts [R, latent]; noise [H, R, latent];
        gumbel [H, R, latent, K] or None -> mean dream return per candidate [P]."""
        p, r = ctrl_w.shape[0], starts.shape[0]
        hidden = self.cell.hidden_size
        z = starts.expand(p, r, self.latent).reshape(p * r, self.latent)
        h = torch.zeros(p * r, hidden)
        c = torch.zeros(p * r, hidden)
        alive = torch.ones(p * r)
        ret = torch.zeros(p * r)
        for t in range(noise.shape[0]):
            x = torch.cat([z, h], -1).reshape(p, r, -1)
            a = torch.baddbmm(ctrl_b[:, None, :], x.to(ctrl_w.dtype), ctrl_w).argmax(-1).reshape(p * r)
            inp = torch.cat([z, nn.functional.one_hot(a, ACTIONS).to(z.dtype)], -1)
            h, c = self.cell(inp, (h, c))
            out = self.latent_head(h).float()
            if self.components == 1:
                mean, logstd = out.reshape(p * r, self.latent, 2).unbind(-1)
            else:
                logits, mean, logstd = out.reshape(p * r, self.latent, self.components, 3).unbind(-1)
                k = (logits / tau + gumbel[t].repeat(p, 1, 1)).argmax(-1, keepdim=True)
                mean, logstd = mean.gather(-1, k)[..., 0], logstd.gather(-1, k)[..., 0]
            eps = noise[t].repeat(p, 1)
            z = mean + torch.exp(logstd.clamp(-7.0, 3.0)) * (tau ** 0.5) * eps
            reward = self.reward_head(h).float()[:, 0]
            p_done = torch.sigmoid(self.done_head(h).float()[:, 0])
            ret = ret + reward * alive
            alive = alive * (p_done <= 0.5).float()
            h, c = h.float(), c.float()
        return ret.reshape(p, r).mean(-1)


def bench(population: int, rollouts: int, horizon: int, repeats: int, mode: str, head: str = "gaussian",
          latent: int = 64, hidden: int = 256, mixtures: int = 5) -> dict:
    """Steps per second of the torch dream in `mode` "fp32" or "bf16" (autocast), median of repeats."""
    torch.manual_seed(0)
    components = 1 if head == "gaussian" else mixtures
    model = Dream(latent, hidden, components).eval()
    ctrl_w = 0.1 * torch.randn(population, latent + hidden, ACTIONS)
    ctrl_b = 0.1 * torch.randn(population, ACTIONS)
    starts = torch.randn(rollouts, latent)
    noise = torch.randn(horizon, rollouts, latent)
    gumbel = None if components == 1 else -torch.log(-torch.log(torch.rand(horizon, rollouts, latent, components)))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")

    def run():
        with autocast:
            return model(ctrl_w, ctrl_b, starts, noise, gumbel)

    t0 = time.perf_counter()
    scores = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(scores).all()
    median = statistics.median(times)
    steps = population * rollouts * horizon
    return {"population": population, "rollouts": rollouts, "mode": f"torch-{mode}", "steps_per_call": steps,
            "median_s": median, "times_s": times, "steps_per_s": steps / median, "first_call_s": first,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64x16,256x64", help="POPULATIONxROLLOUTS,...")
    p.add_argument("--head", choices=("gaussian", "mdn"), default="gaussian")
    p.add_argument("--horizon", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| population x rollouts | mode | steps/s | ms per call |")
    print("|---|---|---:|---:|")
    for part in args.sizes.split(","):
        population, rollouts = (int(n) for n in part.lower().split("x"))
        for mode in ("fp32", "bf16"):
            r = bench(population, rollouts, args.horizon, args.repeats, mode, args.head)
            print(f"| {population} x {rollouts} | {r['mode']} | {r['steps_per_s']:,.0f} | {1e3 * r['median_s']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
