"""Tests for wm_jax.envs.cartpole: the pixel renderer and the PixelCartPole wrapper (offline, CPU, fast)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.envs import cartpole as E
from wm_jax.envs.cartpole import PixelCartPole, render
from wm_jax.envs.draw import FRAME_SIZE, STACK

CART, POLE, TRACK = 255, 170, 90
PX_PER_UNIT = 11.0  # documented in envs/cartpole.py: |x| <= 2.4 maps to |column - 31.5| <= 26.4
X_MAX = 2.4
THETA_MAX = 12 * 2 * np.pi / 360


def img(x: float, theta: float) -> np.ndarray:
    return np.asarray(render(jnp.float32(x), jnp.float32(theta)))


def cart_rows(image: np.ndarray) -> np.ndarray:
    """Rows that contain cart-level pixels."""
    return np.nonzero((image == CART).any(axis=1))[0]


def cart_centroid(image: np.ndarray) -> float:
    """Column centroid of the cart-level (255) pixels."""
    _, cols = np.nonzero(image == CART)
    return float(cols.mean())


def cart_weighted_centroid(image: np.ndarray) -> float:
    """Coverage-weighted column centroid of the cart rows (sub-pixel accurate with anti-aliasing)."""
    band = image[cart_rows(image)].astype(np.float64)
    cols = np.arange(FRAME_SIZE, dtype=np.float64)
    return float((band * cols[None, :]).sum() / band.sum())


def pole_region(image: np.ndarray) -> np.ndarray:
    """The rows above the cart (with a 3 px margin to skip the pole's pivot cap): pole only."""
    top = cart_rows(image).min()
    return image[: top - 3]


def pole_tip_centroid(image: np.ndarray, n_rows: int = 8) -> float:
    """Coverage-weighted column centroid of the topmost `n_rows` rows that show the pole."""
    region = pole_region(image).astype(np.float64)
    rows = np.nonzero(region.any(axis=1))[0][:n_rows]
    band = region[rows]
    cols = np.arange(FRAME_SIZE, dtype=np.float64)
    return float((band * cols[None, :]).sum() / band.sum())


def state_vec(physics) -> np.ndarray:
    return np.array([physics.x, physics.x_dot, physics.theta, physics.theta_dot], np.float64)


# ---------------------------------------------------------------------------------------------
# render


def test_render_shape_dtype_and_determinism():
    a = render(0.3, -0.1)
    assert a.shape == (FRAME_SIZE, FRAME_SIZE) == (64, 64)
    assert a.dtype == jnp.uint8
    b = render(jnp.float32(0.3), jnp.float32(-0.1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(img(0.3, -0.1), img(0.3, -0.1))
    # The frame has the documented gray levels: background, track, pole and cart.
    levels = set(np.unique(img(0.3, -0.1)).tolist())
    assert {0, TRACK, POLE, CART} <= levels
    # Different states draw different pictures.
    assert not np.array_equal(img(0.3, -0.1), img(0.3, 0.1))
    assert not np.array_equal(img(0.3, 0.0), img(-0.3, 0.0))


def test_render_vmap_and_jit_match_per_item():
    rng = np.random.default_rng(0)
    xs = rng.uniform(-X_MAX, X_MAX, 16).astype(np.float32)
    thetas = rng.uniform(-THETA_MAX, THETA_MAX, 16).astype(np.float32)
    per_item = np.stack([img(x, t) for x, t in zip(xs, thetas)])

    vmapped = jax.vmap(render)(jnp.asarray(xs), jnp.asarray(thetas))
    assert vmapped.shape == (16, 64, 64) and vmapped.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(vmapped), per_item)

    jitted = jax.jit(jax.vmap(render))(jnp.asarray(xs), jnp.asarray(thetas))
    np.testing.assert_array_equal(np.asarray(jitted), per_item)

    # render inside someone else's jit, and the un-jitted implementation, agree too.
    inner = jax.jit(lambda x, t: render(x, t) // 1)
    np.testing.assert_array_equal(np.asarray(inner(xs[3], thetas[3])), per_item[3])
    np.testing.assert_array_equal(np.asarray(E._render(xs[5], thetas[5])), per_item[5])


@pytest.mark.parametrize("theta", [-THETA_MAX, 0.0, THETA_MAX])
def test_cart_stays_in_frame(theta):
    for x in np.linspace(-X_MAX, X_MAX, 49):
        image = img(x, theta)
        rows = cart_rows(image)
        assert rows.size > 0, f"no cart pixels at x={x}"
        assert not (image[:, 0] == CART).any() and not (image[:, -1] == CART).any(), f"cart touches the edge at x={x}"
        # Nothing of the cart (not even its anti-aliased rim) reaches the border columns.
        assert (image[rows, 0] == 0).all() and (image[rows, -1] == 0).all(), f"cart rim at the edge at x={x}"


def test_cart_not_clipped_at_the_track_ends():
    # The anti-aliased cart's total coverage (its area in pixels) is the same everywhere: were the cart
    # clipped by the frame edge at |x| = 2.4, it would be smaller there.
    def mass(x):
        image = img(x, 0.0)
        return image[cart_rows(image)].astype(np.float64).sum() / CART

    m0 = mass(0.0)
    assert m0 > 30  # an 8 x 5 px box
    for x in (-X_MAX, -1.234, X_MAX, 0.777):
        assert mass(x) == pytest.approx(m0, abs=0.1), x

    # The number of cart-level (255) pixels depends on the cart's sub-pixel phase (x=0 puts both edges
    # on pixel boundaries, x=+-2.4 does not), so compare positions with the same phase: the two ends
    # (mirror images of each other) and the end positions shifted inwards by a whole number of pixels.
    n_left, n_right = (img(-X_MAX, 0.0) == CART).sum(), (img(X_MAX, 0.0) == CART).sum()
    assert n_left == n_right
    for shift in (3, 20):
        inner = img(X_MAX - shift / PX_PER_UNIT, 0.0)
        assert (inner == CART).sum() == n_right
        # The picture at the right end is the inner picture translated by `shift` columns.
        diff = np.abs(img(X_MAX, 0.0)[:, shift:].astype(int) - inner[:, : FRAME_SIZE - shift].astype(int))
        assert diff.max() <= 1
        inner_left = img(-X_MAX + shift / PX_PER_UNIT, 0.0)
        assert (inner_left == CART).sum() == n_left
        diff = np.abs(img(-X_MAX, 0.0)[:, : FRAME_SIZE - shift].astype(int) - inner_left[:, shift:].astype(int))
        assert diff.max() <= 1


def test_cart_centroid_increases_with_x():
    # Cart-level pixels: the grid step (0.2 units = 2.2 px) exceeds a pixel, so strictly increasing.
    xs = np.linspace(-X_MAX, X_MAX, 25)
    centroids = np.array([cart_centroid(img(x, 0.0)) for x in xs])
    assert (np.diff(centroids) > 0).all(), centroids
    np.testing.assert_allclose(centroids, 31.5 + PX_PER_UNIT * xs, atol=0.6)

    # Coverage-weighted centroid: sub-pixel accurate, so even a 0.55 px grid is strictly increasing,
    # and pole angle does not move it.
    xs = np.linspace(-X_MAX, X_MAX, 97)
    for theta in (0.0, 0.15):
        weighted = np.array([cart_weighted_centroid(img(x, theta)) for x in xs])
        assert (np.diff(weighted) > 0).all()
        np.testing.assert_allclose(weighted, 31.5 + PX_PER_UNIT * xs, atol=0.05)


@pytest.mark.parametrize("x", [-2.0, 0.0, 0.37, 2.4])
def test_pole_leans_with_theta(x):
    upright = img(x, 0.0)
    region = pole_region(upright)
    # Above the cart there is only the pole: its core pixels are at the pole level, none at track/cart.
    assert region.max() == POLE
    assert not ((region == TRACK) | (region == CART)).any()
    centre = cart_weighted_centroid(upright)
    assert pole_tip_centroid(upright) == pytest.approx(centre, abs=0.05)

    offsets = []
    for theta in (0.02, 0.05, 0.1, THETA_MAX):
        right, left = img(x, theta), img(x, -theta)
        assert pole_region(right).max() == POLE and pole_region(left).max() == POLE
        c = cart_weighted_centroid(right)
        assert pole_tip_centroid(right) > c + 0.1, (x, theta)
        assert pole_tip_centroid(left) < cart_weighted_centroid(left) - 0.1, (x, -theta)
        offsets.append(pole_tip_centroid(right) - c)
        # Mirror symmetry: (-x, -theta) is the mirror image of (x, theta).
        mirrored = np.fliplr(img(-x, -theta)).astype(int)
        assert np.abs(mirrored - right.astype(int)).max() <= 1
    # Leaning further moves the top of the pole further.
    assert (np.diff(offsets) > 0).all(), offsets


# ---------------------------------------------------------------------------------------------
# PixelCartPole


@pytest.fixture(scope="module")
def pc():
    return PixelCartPole()


def test_reset_repeats_the_first_frame(pc):
    obs, state = pc.reset(jax.random.key(0))
    assert obs.shape == (64, 64, STACK) == (64, 64, 4)
    assert obs.dtype == jnp.uint8
    obs = np.asarray(obs)
    for k in range(1, STACK):
        np.testing.assert_array_equal(obs[..., k], obs[..., 0])
    np.testing.assert_array_equal(obs[..., -1], img(state.physics.x, state.physics.theta))
    np.testing.assert_array_equal(np.asarray(state.frames), obs)
    assert int(state.physics.time) == 0
    s = state_vec(state.physics)
    assert (np.abs(s) <= 0.05).all()
    # Same key, same reset; another key, another start.
    obs2, state2 = pc.reset(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(obs2), obs)
    _, state3 = pc.reset(jax.random.key(1))
    assert not np.array_equal(state_vec(state3.physics), s)


def test_step_pushes_newest_frame_last(pc):
    obs, state = pc.reset(jax.random.key(3))
    key = jax.random.key(4)
    for t, action in enumerate([0, 1, 1, 0, 1]):
        key, k = jax.random.split(key)
        out = pc.step(k, state, action)
        assert len(out) == 6
        new_obs, new_state, reward, terminated, truncated, info = out
        assert not bool(terminated) and not bool(truncated), "a short alternating sequence must not terminate"
        assert new_obs.shape == (64, 64, 4) and new_obs.dtype == jnp.uint8
        assert float(reward) == 1.0
        assert set(info) >= {"final_observation", "final_state", "terminated", "truncated"}
        new_obs = np.asarray(new_obs)
        np.testing.assert_array_equal(new_obs[..., -1], img(new_state.physics.x, new_state.physics.theta))
        np.testing.assert_array_equal(new_obs[..., :3], np.asarray(obs)[..., 1:])
        np.testing.assert_array_equal(new_obs, np.asarray(new_state.frames))
        # Without termination the final_* entries are just the step's own result.
        np.testing.assert_array_equal(np.asarray(info["final_observation"]), new_obs)
        np.testing.assert_array_equal(state_vec(info["final_state"]), state_vec(new_state.physics))
        assert int(new_state.physics.time) == t + 1
        obs, state = new_obs, new_state
    # After 4 steps no frame of the reset stack is left... and the pictures did change.
    assert not np.array_equal(obs[..., 0], obs[..., -1])


def _run_until_done(pc, key, state, obs, action, max_steps=600):
    for _ in range(max_steps):
        key, k = jax.random.split(key)
        out = pc.step(k, state, action)
        new_obs, new_state, reward, terminated, truncated, info = out
        if bool(terminated) or bool(truncated):
            return obs, state, out
        obs, state = new_obs, new_state
    raise AssertionError("episode did not end")


def test_auto_reset_on_termination(pc):
    obs, state = pc.reset(jax.random.key(7))
    prev_obs, prev_state, out = _run_until_done(pc, jax.random.key(8), state, obs, 1)
    new_obs, new_state, reward, terminated, truncated, info = out
    assert bool(terminated) and not bool(truncated)
    assert bool(info["terminated"]) and not bool(info["truncated"])
    assert float(reward) == 1.0  # the terminating step is rewarded too (gym/gymnax convention)

    final = info["final_state"]
    assert abs(float(final.x)) > X_MAX or abs(float(final.theta)) > THETA_MAX
    # The returned obs/state belong to a fresh episode: four copies of its first frame.
    new_obs = np.asarray(new_obs)
    assert int(new_state.physics.time) == 0
    assert (np.abs(state_vec(new_state.physics)) <= 0.05).all()
    for k in range(STACK):
        np.testing.assert_array_equal(new_obs[..., k], img(new_state.physics.x, new_state.physics.theta))
    np.testing.assert_array_equal(np.asarray(new_state.frames), new_obs)
    # The stack that shows the final state, newest last, is in info.
    fin = np.asarray(info["final_observation"])
    np.testing.assert_array_equal(fin[..., -1], img(final.x, final.theta))
    np.testing.assert_array_equal(fin[..., :3], np.asarray(prev_obs)[..., 1:])
    assert not np.array_equal(fin, new_obs)
    assert int(final.time) == int(prev_state.physics.time) + 1


def test_auto_reset_on_truncation(pc):
    obs, state = pc.reset(jax.random.key(11))
    params = pc.default_params
    # Jump to the last step of the time limit.
    near_end = state.replace(physics=state.physics.replace(time=jnp.int32(params.max_steps_in_episode - 1)))
    new_obs, new_state, reward, terminated, truncated, info = pc.step(jax.random.key(12), near_end, 0)
    assert not bool(terminated) and bool(truncated)
    assert int(new_state.physics.time) == 0
    new_obs = np.asarray(new_obs)
    for k in range(STACK):
        np.testing.assert_array_equal(new_obs[..., k], img(new_state.physics.x, new_state.physics.theta))
    fin = np.asarray(info["final_observation"])
    np.testing.assert_array_equal(fin[..., -1], img(info["final_state"].x, info["final_state"].theta))
    np.testing.assert_array_equal(fin[..., :3], np.asarray(obs)[..., 1:])


# ---------------------------------------------------------------------------------------------
# Physics parity with gymnasium's CartPole-v1


def _policy(name, rng):
    if name == "random":  # ends on the pole angle
        return lambda s: int(rng.integers(2))
    if name == "theta_dot":  # keeps the pole up but drifts: ends on the cart position
        return lambda s: int(s[3] > 0)
    if name == "pd":  # balances: reaches the 500-step time limit
        return lambda s: int(s[2] + 0.5 * s[3] > 0)
    raise ValueError(name)


# Lockstep: gymnasium (float64) and gymnax (float32) run freely from the same start. Their float
# rounding differences grow ~e-fold every 13 steps in this unstable system (1e-7 after one step, 1e-4
# after ~100), so lockstep at atol 1e-4 suits the short random-policy episodes. The long episodes
# (200-500 steps) that end on the cart position or the time limit are checked with gymnasium's state
# re-synchronised to PixelCartPole's before every step (one-step parity, atol 1e-5).
@pytest.mark.parametrize(
    "policy, episodes, resync, how",
    [("random", 6, False, "theta"), ("theta_dot", 2, True, "x"), ("pd", 1, True, "time")],
)
def test_physics_parity_with_gymnasium(pc, policy, episodes, resync, how):
    gym = pytest.importorskip("gymnasium")
    genv = gym.make("CartPole-v1")  # with its TimeLimit(500) wrapper
    rng = np.random.default_rng(1234)
    act = _policy(policy, rng)
    atol = 1e-5 if resync else 1e-4
    for ep in range(episodes):
        genv.reset(seed=100 + ep)
        obs, state = pc.reset(jax.random.key(100 + ep))
        genv.unwrapped.state = state_vec(state.physics)  # float64, as gymnasium keeps it
        key = jax.random.key(200 + ep)
        for t in range(1, 600):
            if resync:
                genv.unwrapped.state = state_vec(state.physics)
            a = act(state_vec(state.physics))
            key, k = jax.random.split(key)
            obs, new_state, reward, terminated, truncated, info = pc.step(k, state, a)
            _, g_reward, g_term, g_trunc, _ = genv.step(a)
            got = state_vec(info["final_state"])
            np.testing.assert_allclose(got, np.asarray(genv.unwrapped.state), rtol=0, atol=atol, err_msg=f"ep {ep} t {t}")
            assert bool(terminated) == g_term, f"ep {ep}: termination differs at step {t}"
            assert bool(truncated) == g_trunc, f"ep {ep}: truncation differs at step {t}"
            assert float(reward) == g_reward
            if g_term or g_trunc:
                break
            np.testing.assert_array_equal(state_vec(new_state.physics), got)
            state = new_state
        else:
            raise AssertionError("episode did not end")
        if how == "theta":
            assert abs(got[2]) > THETA_MAX and t < 500
        elif how == "x":
            assert abs(got[0]) > X_MAX and t < 500
        else:
            assert t == 500 and g_trunc and not g_term
    genv.close()


# ---------------------------------------------------------------------------------------------
# jit / scan / retracing


def test_step_and_reset_inside_scan_match_python_loop(pc):
    actions = jnp.asarray(np.random.default_rng(0).integers(0, 2, 40), jnp.int32)
    keys = jax.random.split(jax.random.key(21), 40)

    @jax.jit
    def rollout(reset_key, keys, actions):
        obs, state = pc.reset(reset_key)

        def body(state, xs):
            k, a = xs
            obs, state, reward, terminated, truncated, info = pc.step(k, state, a)
            return state, (obs, reward, terminated, truncated, info["final_observation"])

        return obs, jax.lax.scan(body, state, (keys, actions))

    obs0, (last, (obs, rewards, term, trunc, fin)) = rollout(jax.random.key(20), keys, actions)
    assert obs.shape == (40, 64, 64, 4) and obs.dtype == jnp.uint8
    assert bool(term.any()), "40 random steps should end at least one episode"

    ref_obs, state = pc.reset(jax.random.key(20))
    np.testing.assert_array_equal(np.asarray(obs0), np.asarray(ref_obs))
    for i in range(40):
        o, state, r, te, tr, info = pc.step(keys[i], state, actions[i])
        np.testing.assert_array_equal(np.asarray(obs[i]), np.asarray(o))
        np.testing.assert_array_equal(np.asarray(fin[i]), np.asarray(info["final_observation"]))
        assert bool(term[i]) == bool(te) and bool(trunc[i]) == bool(tr) and float(rewards[i]) == float(r)
    np.testing.assert_array_equal(state_vec(last.physics), state_vec(state.physics))

    # reset vmaps too (a batch of environments).
    obs_b, state_b = jax.vmap(pc.reset)(jax.random.split(jax.random.key(5), 3))
    assert obs_b.shape == (3, 64, 64, 4)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(obs_b[i, ..., -1]), img(state_b.physics.x[i], state_b.physics.theta[i]))


def test_no_retrace(pc):
    traces = {"step": 0, "reset": 0}

    @jax.jit
    def step(key, state, action):
        traces["step"] += 1
        return pc.step(key, state, action)

    @jax.jit
    def reset(key):
        traces["reset"] += 1
        return pc.reset(key)

    obs, state = reset(jax.random.key(0))
    obs, state = reset(jax.random.key(1))
    assert traces["reset"] == 1
    # A state from reset and a state from step (or from an auto-reset) have the same types.
    ended = 0
    for i in range(30):
        obs, state, reward, terminated, truncated, info = step(
            jax.random.key(100 + i), state, jnp.int32(i % 2 if i < 10 else 1)
        )
        ended += int(terminated)
    assert ended >= 1, "the loop should pass through an auto-reset"
    assert traces["step"] == 1

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step_chex(key, state, action):
        return pc.step(key, state, action)

    _, s0 = pc.reset(jax.random.key(2))
    _, s1, *_ = step_chex(jax.random.key(3), s0, jnp.int32(0))
    step_chex(jax.random.key(4), s1, jnp.int32(1))
    # PixelCartPole's own jitted methods are reused as well.
    pc.step(jax.random.key(5), s0, jnp.int32(0))
    n = pc.step._cache_size() if hasattr(pc.step, "_cache_size") else None
    pc.step(jax.random.key(6), s1, jnp.int32(1))
    if n is not None:
        assert pc.step._cache_size() == n


@pytest.mark.parametrize("x, theta", [(float("nan"), 0.0), (0.0, float("inf")), (float("-inf"), float("nan"))])
def test_render_refuses_a_state_that_is_not_finite(x, theta):
    """Eagerly a ValueError naming the variable; under jit (nothing can be raised) an all-white
    frame, never a plausible picture (NaN used to draw an empty black frame)."""
    with pytest.raises(ValueError, match="must be finite"):
        render(x, theta)
    frame = np.asarray(jax.jit(render)(jnp.float32(x), jnp.float32(theta)))
    assert frame.shape == (FRAME_SIZE, FRAME_SIZE) and (frame == 255).all()
    frames = np.asarray(jax.vmap(render)(jnp.array([0.0, x], jnp.float32), jnp.array([0.0, theta], jnp.float32)))
    assert (frames[1] == 255).all() and not (frames[0] == 255).all()
