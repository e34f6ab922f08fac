"""Where a dream step's time goes: the matmul roofline, XLA's cost analysis and timed pieces.

    python benchmarks/dream_profile.py                      # 64x16 and 256x64, fp32 and bf16
    python benchmarks/dream_profile.py --sizes 64x30 --head mdn --modes bf16

For each size and mode:
- the roofline: a jitted [rows, latent + 2 + hidden] @ [., 4 * hidden] product, the dream's LSTM
  matmul alone outside any loop, in float32 and in bfloat16 with float32 results, measured now, and
  the dream steps/s it allows at the step's FLOPs;
- XLA's cost analysis of one compiled dream step (controller, M's packed cell, sampling): FLOPs and
  bytes accessed per dream step;
- pieces, each a `lax.scan` over the horizon on one block of dreams (the rows a CPU steps together,
  dream.cpu_block), each adding one part of the step to the previous: the LSTM matmul, the LSTM's
  element-wise gates, the heads (= transition.cell_step), sampling z' (imagination.sample_with_noise),
  the controller (controller.act per candidate); then the library's whole population scorer
  (dream.score_population: starts, noise, masks and returns too) at the size;
- the share of the roofline reached: dream steps/s x FLOPs per step / the mode's matmul FLOP/s;
- the alternatives the library's choices were measured against: the whole population stepped at
  once instead of in blocks, a bf16 matmul with bf16 results, the LSTM gates in bfloat16 or with
  XLA's logistic instead of the tanh form.
Medians of --repeats timed calls after one that compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dream_throughput  # (machine(), parse_sizes(), mode_config())

from wm_jax import run_dir
from wm_jax.models import controller, imagination, transition
from wm_jax.search import dream
from wm_jax.config import Config, TransitionConfig

MODES = ("fp32", "bf16")


_median = dream_throughput.median_seconds


def roofline(rows: int, inner: int, out: int, dtype, repeats: int, result=jnp.float32) -> float:
    """FLOP/s of a jitted [rows, inner] @ [inner, out] product (float32 results), 20 per timed call."""
    x, w = jnp.ones((rows, inner), dtype), jnp.ones((inner, out), dtype)
    f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=result))

    def twenty(x, w):
        for _ in range(20):
            r = f(x, w)
        return r

    return 20 * 2 * rows * inner * out / _median(twenty, x, w, repeats=repeats)


def alternatives(rows: int, inner: int, hidden: int, horizon: int, repeats: int) -> dict:
    """What the choices in transition.cell_step were measured against, at `rows` dreams: the LSTM
    matmul in bf16 with bf16 results (FLOP/s), and one step's gates (ms) with float32 and the tanh
    form (the library's), float32 and XLA's logistic, bfloat16 and the tanh form."""
    out = {"bf16_results_matmul_flop_per_s": roofline(rows, inner, 4 * hidden, jnp.bfloat16, repeats, jnp.bfloat16)}
    gates = jax.random.normal(jax.random.key(0), (rows, 4 * hidden))
    for name, dtype, sigmoid in (("gates_f32_tanh_form_ms", jnp.float32, transition.sigmoid),
                                 ("gates_f32_logistic_ms", jnp.float32, jax.nn.sigmoid),
                                 ("gates_bf16_tanh_form_ms", jnp.bfloat16, transition.sigmoid)):
        @jax.jit
        def run(g, c, sigmoid=sigmoid):
            def body(c, _):
                i, f, gg, o = jnp.split(g + 1e-3 * jnp.tile(c[:, :1], (1, 4 * hidden)), 4, -1)
                c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(gg)
                return c + 1e-4 * sigmoid(o) * jnp.tanh(c), None
            return jax.lax.scan(body, c, None, length=horizon)[0]

        out[name] = 1e3 * _median(run, gates.astype(dtype), jnp.zeros((rows, hidden), dtype), repeats=repeats) / horizon
    return out


def pieces(cfg: Config, m_params, pop, starts, noise, horizon: int, repeats: int) -> tuple[list[dict], dict]:
    """Seconds per scan step of each cumulative piece on one block [Pb, R], and XLA's cost of one full step."""
    tcfg, ccfg = cfg.transition, cfg.controller
    cell = transition.pack(tcfg, m_params)
    pb, r = pop.shape[0], starts.shape[0]
    z0 = jnp.broadcast_to(starts, (pb,) + starts.shape)
    zeros = jnp.zeros((pb, r, tcfg.hidden))
    hidden = tcfg.hidden

    def step(level, cell, pop, state, noise_t):
        c, h, z = state
        if level == 0:  # the LSTM matmul alone (its result feeds h so nothing is optimized away)
            x = jnp.concatenate([z.astype(cell.w.dtype), h.astype(cell.w.dtype)], -1)
            g = jnp.dot(x, cell.w, preferred_element_type=jnp.float32)
            return c, g[..., :hidden], z
        a = jax.vmap(lambda w, z, h: controller.act(ccfg, w, z, h))(pop, z, h) if level >= 4 else jnp.zeros(z.shape[:-1], jnp.int32)
        if level == 1:  # + the LSTM's gates, no heads
            x = jnp.concatenate([z.astype(cell.w.dtype), h.astype(cell.w.dtype)], -1)
            gates = jnp.dot(x, cell.w, preferred_element_type=jnp.float32) + cell.action[a]
            i, f, g, o = jnp.split(gates, 4, -1)
            c = transition.sigmoid(f) * c + transition.sigmoid(i) * jnp.tanh(g)
            return c, transition.sigmoid(o) * jnp.tanh(c), z
        (c, h), pred = transition.cell_step(cell, (c, h), z, a)
        if level == 2:  # + the heads: keep the prediction alive through z
            return c, h, z + 1e-6 * (pred.mean[..., 0] + pred.reward[..., None] + pred.done_logit[..., None])
        gumbel, eps = noise_t
        return c, h, imagination.sample_with_noise(pred, (gumbel, eps))  # levels 3 (+ sampling), 4 (+ controller)

    rows = []
    names = ("LSTM matmul", "+ LSTM gates", "+ heads (cell_step)", "+ sampling z'", "+ controller")
    for level, name in enumerate(names):
        @jax.jit
        def run(cell, pop, noise, level=level):
            return jax.lax.scan(lambda s, n: (step(level, cell, pop, s, n), None), (zeros, zeros, z0), noise)[0]

        rows.append({"piece": name, "s_per_step": _median(run, cell, pop, noise, repeats=repeats) / horizon})
    one = jax.jit(lambda cell, pop, state, n: step(4, cell, pop, state, n))
    noise_0 = jax.tree.map(lambda x: x[0], noise)
    cost = one.lower(cell, pop, (zeros, zeros, z0), noise_0).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return rows, {"flops": float(cost.get("flops", 0.0)) / (pb * r), "bytes": float(cost.get("bytes accessed", 0.0)) / (pb * r)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=dream_throughput.parse_sizes, default=((64, 16), (256, 64)))
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    p.add_argument("--head", choices=("gaussian", "mdn"), default="gaussian")
    p.add_argument("--horizon", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="default benchmarks/results/dream_profile_PLATFORM.json")
    args = p.parse_args(argv)
    modes = dream_throughput.parse_modes(p, args.modes, MODES)
    info = dream_throughput.machine()
    if args.json is None:
        args.json = Path(__file__).resolve().parent / "results" / f"dream_profile_{info['platform']}.json"
    base = dataclasses.replace(Config(), transition=TransitionConfig(head=args.head))
    latent, hidden = base.vae.latent, base.transition.hidden
    m_params = transition.init(jax.random.key(0), base.transition, latent)
    k1, k2 = jax.random.split(jax.random.key(3))
    stored = (jax.random.normal(k1, (1024, latent)), -2.0 + 0.1 * jax.random.normal(k2, (1024, latent)))
    print(f"Machine: {info['platform']} ({info['device_kind']}) x{info['devices']}, {info['cpu_cores']} CPU cores, "
          f"jax {info['jax']}; M: LSTM {hidden}, latent {latent}, {args.head} head; horizon {args.horizon}")
    results, others = [], []
    for population, rollouts in args.sizes:
        block = dream.cpu_block(population, rollouts)
        rows_per_block = block * rollouts
        roof = {m: roofline(rows_per_block, latent + 2 + hidden, 4 * hidden, jnp.float32 if m == "fp32" else jnp.bfloat16,
                            args.repeats) for m in modes}
        for mode in modes:
            cfg, _ = dream_throughput.mode_config(base, "bf16" if mode == "bf16" else "fp32")
            dims = controller.num_params(cfg.controller, latent, hidden)
            pop = 0.1 * jax.random.normal(jax.random.key(1), (population, dims))
            starts = dream.draw_starts(jax.random.key(4), *stored, rollouts)
            keys = jax.random.split(jax.random.key(5), args.horizon * rollouts).reshape(args.horizon, rollouts)
            components = transition.components(cfg.transition)
            noise = jax.vmap(jax.vmap(partial(imagination.latent_noise, latent=latent, components=components)))(keys)
            parts, cost = pieces(cfg, m_params, pop[:block], starts, noise, args.horizon, args.repeats)
            score = partial(dream.score_population, cfg, m_params=m_params, population=pop, mean=stored[0],
                            logvar=stored[1], rollouts=rollouts, horizon=args.horizon)
            whole = _median(score, jax.random.key(6), repeats=args.repeats)
            steps_per_s = population * rollouts * args.horizon / whole
            # the roofline in dream steps/s: the matmul's FLOP/s over the step's FLOPs (XLA's count)
            roof_steps = roof[mode] / cost["flops"]
            result = {"population": population, "rollouts": rollouts, "block_candidates": block, "mode": mode,
                      "matmul_flop_per_s": roof[mode], "flops_per_step": cost["flops"], "bytes_per_step": cost["bytes"],
                      "pieces": parts, "dream_steps_per_s": steps_per_s, "roofline_steps_per_s": roof_steps,
                      "roofline_share": steps_per_s / roof_steps}
            results.append(result)
            print(f"\n## {population} x {rollouts}, {mode} (blocks of {block} candidates = {rows_per_block} dreams)")
            print(f"matmul roofline {roof[mode] / 1e9:.0f} GFLOP/s; XLA cost of one step: "
                  f"{cost['flops'] / 1e6:.3f} MFLOP, {cost['bytes'] / 1e3:.1f} kB per dream step; "
                  f"roofline {roof_steps:,.0f} dream steps/s")
            print("| piece (cumulative) | ms per scan step | added ms | dream steps/s |")
            print("|---|---:|---:|---:|")
            prev = 0.0
            for part in parts:
                t = part["s_per_step"]
                print(f"| {part['piece']} | {1e3 * t:.3f} | {1e3 * (t - prev):+.3f} | {rows_per_block / t:,.0f} |")
                prev = t
            t_whole = whole / args.horizon * (block / population)
            print(f"| whole scorer (dream.score_population) | {1e3 * t_whole:.3f} | {1e3 * (t_whole - prev):+.3f} | "
                  f"{steps_per_s:,.0f} |")
            print(f"share of the {mode} matmul roofline: {100 * result['roofline_share']:.0f}%", flush=True)
            if block < population:  # the same scorer with the whole population stepped together
                saved, dream.CPU_BLOCK_ROWS = dream.CPU_BLOCK_ROWS, population * rollouts
                jax.clear_caches()
                try:
                    unblocked = _median(score, jax.random.key(6), repeats=args.repeats)
                finally:
                    dream.CPU_BLOCK_ROWS = saved
                    jax.clear_caches()
                result["unblocked_steps_per_s"] = population * rollouts * args.horizon / unblocked
                print(f"without blocks (all {population * rollouts} dreams stepped together): "
                      f"{result['unblocked_steps_per_s']:,.0f} dream steps/s")
        alt = alternatives(rows_per_block, latent + 2 + hidden, hidden, args.horizon, args.repeats)
        others.append({"population": population, "rollouts": rollouts, "rows": rows_per_block, **alt})
        print(f"\nalternatives at {rows_per_block} dreams: bf16 matmul with bf16 results "
              f"{alt['bf16_results_matmul_flop_per_s'] / 1e9:.0f} GFLOP/s (float32 results: "
              f"{roof.get('bf16', float('nan')) / 1e9:.0f}); one step's LSTM gates: float32 tanh form "
              f"{alt['gates_f32_tanh_form_ms']:.3f} ms, float32 logistic {alt['gates_f32_logistic_ms']:.3f} ms, "
              f"bfloat16 tanh form {alt['gates_bf16_tanh_form_ms']:.3f} ms", flush=True)
    out = {"machine": info, "head": args.head, "hidden": hidden, "latent": latent, "horizon": args.horizon,
           "results": results, "alternatives": others}
    run_dir.write_json(args.json, out)
    print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
