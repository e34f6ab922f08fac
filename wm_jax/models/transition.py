"""M: the LSTM transition h' = f(h, z, a) with latent, reward and done heads (Ha's MDN-RNN).

The recurrent interface is uniform (dreamerv3 rssm style): `initial_carry(cfg, batch)`,
`step(cfg, params, carry, z, a) -> (carry, prediction)`, usable inside scan and vmap, and
`observe` (teacher forcing over a sequence with episode-boundary resets) for training.

The latent head predicts p(z_{t+1} | h_{t+1}): a diagonal Gaussian, or per-dimension mixtures of
`mixtures` Gaussians (Ha's MDN). Sampling at temperature tau divides the mixture logits by tau and
scales sigma by sqrt(tau), as Ha's doomrnn does. The done head is a logit for "a_t ended the
episode", trained with the positive class up-weighted since deaths are rare.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wm_jax.store.data import sequence_batch, training_arrays  # M's batches, defined beside the rows
from wm_jax import precision, stats
from wm_jax.models import quant
from wm_jax.models import train as train_lib
from wm_jax.config import Config, TransitionConfig

Params = Any
CARTPOLE_ACTIONS = 2  # the action count a checkpoint leaves unrecorded (model_config)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class Prediction(NamedTuple):
    logits: jax.Array  # [..., latent, K] mixture logits (K = 1 for the Gaussian head)
    mean: jax.Array  # [..., latent, K]
    logstd: jax.Array  # [..., latent, K]
    reward: jax.Array  # [...]
    done_logit: jax.Array  # [...]


class _Net(nn.Module):
    """M's parameters (flax's LSTM cell and dense heads): `init` builds them with it, and it is the
    reference M's `cell_step` must agree with (tests); stepping itself uses the packed `Cell`."""

    hidden: int
    latent: int
    components: int
    actions: int = CARTPOLE_ACTIONS
    continuous: bool = False

    def setup(self) -> None:
        self.cell = nn.OptimizedLSTMCell(self.hidden, name="lstm")
        self.latent_head = nn.Dense(3 * self.latent * self.components, name="latent_head")
        self.reward_head = nn.Dense(1, name="reward_head")
        self.done_head = nn.Dense(1, name="done_head")

    def __call__(self, carry, z, a):
        x = jnp.concatenate([z, action_input(a, self.actions, self.continuous, z.dtype)], axis=-1)
        carry, h = self.cell(carry, x)
        raw = self.latent_head(h).reshape(h.shape[:-1] + (self.latent, self.components, 3))
        logits, mean, logstd = raw[..., 0], raw[..., 1], raw[..., 2]
        logstd = jnp.clip(logstd, -7.0, 3.0)  # keeps exp() and 1/sigma finite early in training
        pred = Prediction(
            logits=logits,
            mean=mean,
            logstd=logstd,
            reward=self.reward_head(h)[..., 0],
            done_logit=self.done_head(h)[..., 0],
        )
        return carry, pred


def action_input(a: jax.Array, actions: int, continuous: bool, dtype: Any) -> jax.Array:
    """What M and K read of an action: a one-hot of a discrete one, a continuous vector as it is."""
    return jnp.asarray(a, dtype) if continuous else jax.nn.one_hot(a, actions, dtype=dtype)


def null_action(cfg: TransitionConfig, shape: tuple[int, ...] = ()) -> jax.Array:
    """Action zeros of leading `shape` in the task's form: int32 indices, or float32 vectors of cfg.actions."""
    return jnp.zeros(shape + (cfg.actions,), jnp.float32) if cfg.continuous else jnp.zeros(shape, jnp.int32)


def components(cfg: TransitionConfig) -> int:
    return cfg.mixtures if cfg.head == "mdn" else 1


def _net(cfg: TransitionConfig, latent: int) -> _Net:
    return _Net(hidden=cfg.hidden, latent=latent, components=components(cfg), actions=cfg.actions,
                continuous=cfg.continuous)


def initial_carry(cfg: TransitionConfig, batch: int | tuple[int, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """The LSTM's (c, h) at the start of an episode: zeros of shape [*batch, hidden]."""
    shape = (batch,) if isinstance(batch, int) else tuple(batch)
    zeros = jnp.zeros(shape + (cfg.hidden,), jnp.float32)
    return (zeros, zeros)


def hidden(carry: tuple[jax.Array, jax.Array]) -> jax.Array:
    """h, the part of the carry the controller sees."""
    return carry[1]


def init(key: jax.Array, cfg: TransitionConfig, latent: int) -> Params:
    return _net(cfg, latent).init(key, initial_carry(cfg, 1), jnp.zeros((1, latent)), null_action(cfg, (1,)))


class Cell(NamedTuple):
    """M's weights laid out for stepping: packed once per program (`pack`), not at every step.

    The LSTM's eight kernels become one [latent + hidden, 4 * hidden] matrix, so a step is one
    matmul of [z, h]; a discrete action's one-hot times its kernel rows is a row lookup, folded with
    the bias into `action` (a continuous action vector is a dense map: `action` is its kernel and
    `action_bias` the bias); the latent, reward and done heads are one [hidden, outputs] matrix. The
    matrices are in the compute dtype, the rest float32.
    """

    w: jax.Array  # [latent + hidden, 4 * hidden]: rows for z, then h; columns for gates i, f, g, o
    action: jax.Array  # [actions, 4 * hidden] float32: the action's kernel row plus the bias (continuous: the kernel)
    head_w: jax.Array  # [hidden, 3 * latent * K + 2]: logits, means, logstds, reward, done (K = 1: no logits)
    head_b: jax.Array  # float32
    # INT8 (`quantize`): w and head_w are int8 and these their per-column float32 scales; else None
    w_scale: jax.Array | None = None
    head_scale: jax.Array | None = None
    action_bias: jax.Array | None = None  # [4 * hidden] float32 for a continuous action; else None


def action_gates(cell: Cell, a: jax.Array) -> jax.Array:
    """The action's share of the gates (bias included): a row lookup, or a continuous vector's dense map."""
    if cell.action_bias is None:
        return cell.action[jnp.asarray(a, jnp.int32)]
    return jnp.dot(jnp.asarray(a, jnp.float32), cell.action, precision="highest") + cell.action_bias


def pack(cfg: TransitionConfig, params: Params) -> Cell:
    """`params` (flax's layout, float32) as a Cell in cfg.compute_dtype; differentiable. A Cell
    (an INT8 one from `quantize`, or one packed before) is returned as it is, in its own precision."""
    if isinstance(params, Cell):
        return params
    p = params["params"]
    lstm = p["lstm"]
    w_in = jnp.concatenate([lstm[f"i{g}"]["kernel"] for g in "ifgo"], axis=-1)  # [latent + actions, 4h]
    w_h = jnp.concatenate([lstm[f"h{g}"]["kernel"] for g in "ifgo"], axis=-1)
    bias = jnp.concatenate([lstm[f"h{g}"]["bias"] for g in "ifgo"], axis=-1)
    latent = w_in.shape[0] - cfg.actions
    k = components(cfg)
    head_w = p["latent_head"]["kernel"].reshape(cfg.hidden, latent, k, 3)
    head_b = p["latent_head"]["bias"].reshape(latent, k, 3)
    if k == 1:  # one component: its logit never matters, so it is not computed
        head_w, head_b = head_w[..., 1:], head_b[..., 1:]
    # columns grouped by kind (logits, means, logstds), each [latent, K] contiguous, so each comes
    # out of the result as one contiguous slice instead of every third column
    head_w = jnp.moveaxis(head_w, -1, 1).reshape(cfg.hidden, -1)
    head_b = jnp.moveaxis(head_b, -1, 0).reshape(-1)
    head_w = jnp.concatenate([head_w, p["reward_head"]["kernel"], p["done_head"]["kernel"]], -1)
    head_b = jnp.concatenate([head_b, p["reward_head"]["bias"], p["done_head"]["bias"]], -1)
    dt = precision.DTYPES[cfg.compute_dtype]
    action = {"action": w_in[latent:], "action_bias": bias} if cfg.continuous else {"action": w_in[latent:] + bias}
    return Cell(w=jnp.concatenate([w_in[:latent], w_h], 0).astype(dt), head_w=head_w.astype(dt), head_b=head_b,
                **action)


def quantize(cfg: TransitionConfig, params: Params) -> Cell:
    """M for INT8 serving: the packed Cell with int8 w and head_w (one scale per output column,
    from the float32 weights); `cell_step`, `imagination.imagine`, `observe` and the agent step take it in
    place of `params`. Activations are quantized per row at every step (wm_jax.models.quant.matmul)."""
    if isinstance(params, Cell):
        raise TypeError("transition.quantize needs M's float32 parameters (flax's layout), got a packed Cell")
    cell = pack(dataclasses.replace(cfg, compute_dtype="float32"), params)
    w, head_w = quant.per_channel(cell.w), quant.per_channel(cell.head_w)
    return cell._replace(w=w.q, head_w=head_w.q, w_scale=w.scale[0], head_scale=head_w.scale[0])


DONE_P = 0.5  # Ha & Schmidhuber's rule: a dream ends at the step whose p_done exceeds this


def p_done(pred: Prediction) -> jax.Array:
    """M's probability that the episode ends at the predicted step."""
    return jax.nn.sigmoid(pred.done_logit)


def ends(p: jax.Array) -> jax.Array:
    """The done rule, written once: 1.0 where p_done > DONE_P (that step still counts, every later
    one is dead), else 0.0. Dreams, macro dreams, the server's look-ahead and the video use it."""
    return (p > DONE_P).astype(jnp.float32)


def alive(ends: jax.Array) -> jax.Array:
    """The done rule as a mask over a dream's steps [L] (from `ends`): the step where the done head
    fires still counts, every later one is dead."""
    return jnp.cumprod(jnp.concatenate([jnp.ones((1,), ends.dtype), 1.0 - ends[:-1]]))


def sigmoid(x: jax.Array) -> jax.Array:
    """The logistic function in its tanh form (M's LSTM gates)."""
    # The tanh form: one transcendental, where XLA's logistic costs an exp and a division; equal up
    # to float rounding (one dream step's gates at 1,024 dreams: 0.43 against 0.47-0.72 ms,
    # benchmarks/dream_profile.py)
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def _lstm(gates: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The LSTM's element-wise part, float32: pre-activations [..., 4 * hidden] (i, f, g, o) -> (c, h)."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = sigmoid(f) * c.astype(jnp.float32) + sigmoid(i) * jnp.tanh(g)
    return c, sigmoid(o) * jnp.tanh(c)


def _heads(cell: Cell, h: jax.Array, latent: int) -> Prediction:
    """The latent, reward and done heads on h [..., hidden], one matmul."""
    out = quant.matmul(h, cell.head_w, cell.head_scale) + cell.head_b
    columns = out.shape[-1] - 2
    if columns == 2 * latent:  # Gaussian: one component, means then logstds; its logit is 0
        mean, logstd = (out[..., i * latent:(i + 1) * latent, None] for i in range(2))
        logits = jnp.zeros_like(mean)
    else:  # a mixture of columns / (3 * latent) components: logits, means, logstds, each [latent, K]
        k = columns // (3 * latent)
        logits, mean, logstd = (out[..., i * latent * k:(i + 1) * latent * k].reshape(out.shape[:-1] + (latent, k))
                                for i in range(3))
    return Prediction(logits=logits, mean=mean, logstd=jnp.clip(logstd, -7.0, 3.0),
                      reward=out[..., -2], done_logit=out[..., -1])


def cell_step(
    cell: Cell, carry: tuple[jax.Array, jax.Array], z: jax.Array, a: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], Prediction]:
    """`step` on a packed Cell: matmuls in the Cell's dtype with float32 results, the rest float32."""
    c, h = carry
    if cell.w_scale is None:  # one matmul of [z, h]
        dt = cell.w.dtype
        x = jnp.concatenate([z.astype(dt), h.astype(dt)], axis=-1)
        gates = jnp.dot(x, cell.w, preferred_element_type=jnp.float32)
    else:  # INT8: z and h quantized apart (their ranges differ: z ~ N(0, 1), h in [-1, 1])
        latent = z.shape[-1]
        gates = quant.matmul(z, cell.w[:latent], cell.w_scale) + quant.matmul(h, cell.w[latent:], cell.w_scale)
    gates = gates + action_gates(cell, a)
    c, h = _lstm(gates, c)
    return (c, h), _heads(cell, h, z.shape[-1])


def step(
    cfg: TransitionConfig, params: Params, carry: tuple[jax.Array, jax.Array], z: jax.Array, a: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], Prediction]:
    """One transition: (h_t, z_t, a_t) -> h_{t+1} and the prediction for z_{t+1}, r_t, done_t.

    Matmuls in cfg.compute_dtype (float32 accumulation); the carry and the prediction are float32.
    Inside a loop, `pack` once and call `cell_step`.
    """
    return cell_step(pack(cfg, params), carry, z, a)


def latent_nll(pred: Prediction, z_next: jax.Array) -> jax.Array:
    """-log p(z_next | h'), summed over latent dimensions; [...]."""
    z = z_next[..., None]
    log_normal = -0.5 * jnp.square((z - pred.mean) * jnp.exp(-pred.logstd)) - pred.logstd - _LOG_SQRT_2PI
    log_mix = jax.nn.log_softmax(pred.logits, axis=-1)
    return -jnp.sum(jax.nn.logsumexp(log_mix + log_normal, axis=-1), axis=-1)


def latent_kl_mc(key: jax.Array, mean: jax.Array, logvar: jax.Array, pred: Prediction) -> jax.Array:
    """One-sample estimate of KL(q || p) with q the encoder posterior (mean, logvar) and p M's
    predicted distribution for that latent."""
    z = stats.gaussian_sample(key, mean, logvar)
    log_q = jnp.sum(-0.5 * jnp.square(z - mean) / jnp.exp(logvar) - 0.5 * logvar - 0.5 * jnp.log(2 * jnp.pi))
    return log_q + latent_nll(pred, z)


def mixture_moments(pred: Prediction) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of the predicted mixture per latent dimension (tau = 1)."""
    w = jax.nn.softmax(pred.logits, axis=-1)
    mean = jnp.sum(w * pred.mean, axis=-1)
    second = jnp.sum(w * (jnp.exp(2 * pred.logstd) + jnp.square(pred.mean)), axis=-1)
    return mean, second - jnp.square(mean)


def observe(
    cfg: TransitionConfig, params: Params, z: jax.Array, a: jax.Array, reset: jax.Array
) -> Prediction:
    """Teacher forcing over [B, L] sequences; the carry restarts wherever reset[:, t] is set.

    The restart is a mask inside the scan (purejaxrl ppo_rnn), so one program serves any batch.
    """
    return observe_carries(cfg, params, z, a, reset)[1]


def observe_carries(
    cfg: TransitionConfig, params: Params, z: jax.Array, a: jax.Array, reset: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], Prediction]:
    """`observe` that also returns the carry each step started from: ((c, h) [B, L, hidden], preds)."""
    batch, latent = z.shape[0], z.shape[-1]
    init_c = initial_carry(cfg, batch)
    cell = pack(cfg, params)
    # Teacher forcing knows every input in advance: the inputs' share of the gates for all steps is
    # one large matmul before the loop, the heads on every h one after it; only h's matmul stays
    # in the loop (the same sums as cell_step, up to float rounding; half the time of stepping it).
    from_inputs = quant.matmul(z, cell.w[:latent], cell.w_scale)
    from_inputs = from_inputs + action_gates(cell, a)
    w_h = cell.w[latent:]

    def body(carry, inputs):
        x_t, reset_t = inputs
        carry = jax.tree.map(lambda c, c0: jnp.where(reset_t[:, None], c0, c), carry, init_c)
        c, h = carry
        new_carry = _lstm(x_t + quant.matmul(h, w_h, cell.w_scale), c)
        return new_carry, (carry, new_carry[1])

    xs = (jnp.swapaxes(from_inputs, 0, 1), jnp.swapaxes(reset, 0, 1))
    _, (carries, h_after) = jax.lax.scan(body, init_c, xs)
    carries, h_after = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (carries, h_after))
    return carries, _heads(cell, h_after, latent)


def loss(
    cfg: TransitionConfig, params: Params, batch: dict[str, jax.Array], key: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher-forced loss on a batch of sequences.

    batch: z[B, L, latent] (sampled from the encoder posterior), z_next[B, L, latent], action,
    reward, done[B, L], and the masks reset, valid, next_valid[B, L] from data.sample_sequences.
    Latent NLL counts only where the next frame exists in the same episode (next_valid); reward and
    done count on every valid row. Each term is a masked mean; the total is their weighted sum.
    With cfg.input_dropout > 0 (needs `key`) input dimensions of z are dropped (inverted dropout);
    with cfg.z_penalty > 0 the mean squared predicted z' is added with that weight; with
    cfg.contrastive > 0 the `contrastive_loss` term with that weight.
    """
    z = batch["z"]
    if cfg.input_dropout > 0.0:
        if key is None:
            raise ValueError("TransitionConfig.input_dropout > 0 needs a key for the dropout mask")
        keep = jax.random.bernoulli(key, 1.0 - cfg.input_dropout, z.shape)
        z = jnp.where(keep, z / (1.0 - cfg.input_dropout), 0.0)
    carries, pred = observe_carries(cfg, params, z, batch["action"], batch["reset"])
    valid = batch["valid"].astype(jnp.float32)
    next_valid = batch["next_valid"].astype(jnp.float32)
    nll = latent_nll(pred, batch["z_next"])
    reward_err = jnp.square(pred.reward - batch["reward"])
    done = batch["done"].astype(jnp.float32)
    log_p, log_not_p = jax.nn.log_sigmoid(pred.done_logit), jax.nn.log_sigmoid(-pred.done_logit)
    done_bce = -(cfg.done_pos_weight * done * log_p + (1.0 - done) * log_not_p)
    assert nll.shape == reward_err.shape == done_bce.shape == valid.shape, (nll.shape, valid.shape)

    terms = {
        "latent_nll": stats.masked_mean(nll, next_valid),
        "reward": stats.masked_mean(reward_err, valid),
        "done": stats.masked_mean(done_bce, valid),
    }
    weights = {"latent_nll": 1.0, "reward": cfg.reward_weight, "done": cfg.done_weight}
    if cfg.z_penalty > 0.0:
        terms["z_penalty"] = stats.masked_mean(jnp.mean(jnp.square(mixture_moments(pred)[0]), axis=-1), next_valid)
        weights["z_penalty"] = cfg.z_penalty
    if cfg.contrastive > 0.0:
        terms["contrastive"] = contrastive_loss(cfg, params, carries, z, batch["action"], pred, batch["z_next"],
                                                next_valid)
        weights["contrastive"] = cfg.contrastive
    assert terms.keys() == weights.keys()
    total = sum(weights[k] * terms[k] for k in terms)
    metrics = {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}
    return total, metrics


def contrastive_loss(
    cfg: TransitionConfig, params: Params, carries: tuple[jax.Array, jax.Array], z: jax.Array, a: jax.Array,
    pred: Prediction, z_next: jax.Array, mask: jax.Array,
) -> jax.Array:
    """InfoNCE on M's predicted next latent, over [B, L] teacher-forced steps (`observe_carries`).

    The query is M's prediction for z_{t+1} (the mixture mean); the candidates are the true z_{t+1}
    (the positive), the mean M predicts from the same carry and z_t under the next action,
    (a + 1) mod cfg.actions (the other one for CartPole; for a continuous action, -a: a
    perturbed-action negative, held fixed: no gradient flows into it), and the true z' of every
    other step of the batch where `mask` holds (in-batch negatives). score = -mean squared
    distance / cfg.contrastive_temperature; the loss is the masked mean of -log softmax(score)[positive].
    """
    q = mixture_moments(pred)[0]  # [B, L, latent]
    other_a = -jnp.asarray(a, jnp.float32) if cfg.continuous else (jnp.asarray(a, jnp.int32) + 1) % cfg.actions
    _, other = cell_step(pack(cfg, params), carries, z, other_a)
    k_other = jax.lax.stop_gradient(mixture_moments(other)[0])
    latent = q.shape[-1]
    scale = 1.0 / (cfg.contrastive_temperature * latent)
    qf, kf = q.reshape(-1, latent), jnp.asarray(z_next, q.dtype).reshape(-1, latent)
    m = mask.reshape(-1).astype(bool)
    # squared distances of every query to every true z' of the batch: [N, N]
    d = jnp.sum(qf * qf, -1)[:, None] + jnp.sum(kf * kf, -1)[None, :] - 2.0 * qf @ kf.T
    scores = jnp.where(m[None, :], -d * scale, -jnp.inf)  # steps without a next latent are no candidates
    positive = -jnp.sum(jnp.square(qf - kf), -1) * scale
    other_score = -jnp.sum(jnp.square(qf - k_other.reshape(-1, latent)), -1) * scale
    log_z = jnp.logaddexp(jax.nn.logsumexp(scores, axis=-1), other_score)  # the diagonal is the positive
    return stats.masked_mean((log_z - positive).reshape(mask.shape), mask.astype(jnp.float32))


def train(cfg: Config, key: jax.Array, data: dict[str, Any], out_dir, progress: bool = True,
          init_params: Params | None = None, seeds: train_lib.Seeds | None = None, limits: Any = None
          ) -> tuple[Params, dict[str, Any]]:
    """Teacher-forced training of M (cfg.transition) on per-row posteriors, data as
    `training_arrays` (see `sequence_batch`); resumable in out_dir. `init_params` continues from a
    trained M (fine-tuning: Config.for_round sets its steps). With `seeds` (train.Seeds), key,
    init_params and (unless seeds.shared_data) data carry a leading axis of seeds; data's optional
    "rows" ([seeds]) is each seed's own row count (the rows after it pad the arrays to one shape),
    and `limits` each seed's own step count."""
    latent, cfg = cfg.vae.latent, cfg.transition
    tcfg = cfg.train
    params, key_train = train_lib.split_init(key, lambda k: init(k, cfg, latent), seeds)
    params = params if init_params is None else init_params
    d = {k: jnp.asarray(data[k]) for k in DATA_KEYS + (("rows",) if "rows" in data else ())}
    static = cfg.static()
    return train_lib.fit("transition", tcfg, train_lib.Bound(_loss, static), train_lib.Bound(_sample, static), d,
                         params, key_train, out_dir, model_config(cfg, int(latent)), progress, seeds, limits)


DATA_KEYS = ("mean", "logvar", "action", "reward", "done", "is_first", "is_last")  # training_arrays' per-row arrays


def _sample(cfg: TransitionConfig, key: jax.Array, d: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return sequence_batch(key, d, cfg.train.batch, cfg.seq_len)


def _loss(cfg: TransitionConfig, params: Params, key: jax.Array, batch: dict[str, jax.Array], step: jax.Array):
    return loss(cfg, params, batch, key)


def model_config(cfg: TransitionConfig, latent: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be loaded into `cfg` (training settings stored apart).

    Not the compute dtype (parameters are float32 whatever it is) nor the training-loss switches
    (input_dropout, z_penalty, contrastive), so checkpoints written before they existed keep loading;
    the action count and kind only where they are not CartPole's (2, discrete), for the same reason.
    """
    skip = ("train", "compute_dtype", "input_dropout", "z_penalty", "contrastive", "contrastive_temperature")
    skip += ("actions",) if cfg.actions == CARTPOLE_ACTIONS and not cfg.continuous else ()
    skip += () if cfg.continuous else ("continuous",)
    return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}, "latent": int(latent)}


def load(cfg: Config, out_dir, identity: dict[str, Any] | None = None, seeds: int | None = None) -> Params:
    """M trained by `train` into out_dir (with the same cfg: a fine-tuning round's, Config.for_round;
    exactly the recorded step with `identity`: train.load_params); with `seeds`, a seed-batched
    training's [seeds] of them."""
    latent, cfg = cfg.vae.latent, cfg.transition
    like = train_lib.seeds_like(init(jax.random.key(0), cfg, latent), seeds)
    return train_lib.load_params(cfg.train, like, out_dir, model_config(cfg, latent), identity,
                                 batched=seeds is not None)
