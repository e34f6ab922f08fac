"""Dream videos: a real episode, V's reconstruction and M's open-loop dream, frame by frame.

    rec = rollout.open_loop(cfg, params, key, 500)
    video.write("episode.gif", video.frames(rec))      # an animated GIF (Pillow), frames streamed
    video.render(rec)                                  # the same frames as one uint8[T, H, W, 3] array

Each frame shows three panels (real | V recon | M dream from the episode's first latent, under the
real actions) and a caption: step, action, real reward, M's predicted reward and p(done) and, with
a verifier, K's confidence in the dream's transition. Under the caption a small plot of the dream's
pixel error against V's reconstruction over the whole episode, with a cursor at the current step
and a red line where the dream ended (M's p(done) > 0.5, Ha's rule): where the dream drifts away
or ends is visible at a glance. `wm-jax video` and the pipeline (episode.gif) write it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from wm_jax import envs
from wm_jax.models import transition
from wm_jax.search import rollout

SCALE = 3  # each 64x64 panel is drawn at 192x192
MAX_FPS = 50  # GIF frame delays under 20 ms are shown at 100 ms by most viewers
PAD = 6
TITLE_H = 16
CAPTION_H = 34
PLOT_H = 40
BLACK, RED, NAVY, BLUE, GRAY, LIGHT = (0, 0, 0), (220, 0, 0), (0, 0, 120), (0, 0, 160), (90, 90, 90), (180, 180, 180)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _panel(image01: np.ndarray) -> np.ndarray:
    """A [64, 64] image in [0, 1] as uint8 RGB, scaled up."""
    gray = np.clip(np.asarray(image01, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    gray = np.repeat(np.repeat(gray, SCALE, axis=0), SCALE, axis=1)
    return np.repeat(gray[..., None], 3, axis=-1)


def render(rec: dict[str, Any], episode: int | None = None, names: tuple[str, ...] = ()) -> np.ndarray:
    """The frames (uint8[T, H, W, 3]) of one `rollout.open_loop` record, T = the episode's length."""
    return np.stack(list(frames(rec, episode, names)))


def action_names(cfg: Any) -> tuple[str, ...]:
    """What the captions call cfg's task's discrete actions (EnvSpec.action_names; () where unnamed)."""
    return envs.spec(cfg.env).action_names


def _action_text(action: Any, names: tuple[str, ...]) -> str:
    """An action for the caption: its name, its index, or a continuous vector's numbers."""
    a = np.asarray(action)
    if a.ndim:
        return " ".join(f"{v:+.2f}" for v in a.ravel())
    return names[int(a)] if int(a) < len(names) else str(int(a))


def frames(rec: dict[str, Any], episode: int | None = None, names: tuple[str, ...] = ()) -> Iterator[np.ndarray]:
    """The frames of one `rollout.open_loop` record one at a time (uint8[H, W, 3]; a 500-step
    episode is 265 MB as one array); `names` label the discrete actions (`action_names`)."""
    from PIL import Image, ImageDraw

    length = max(1, int(np.sum(rec["valid"])))
    size = 64 * SCALE
    width = 3 * size + 4 * PAD
    height = TITLE_H + size + CAPTION_H + PLOT_H + 2 * PAD
    p_done = np.asarray(rec["dream_p_done"], np.float64)[:length]
    ended = np.flatnonzero(np.asarray(transition.ends(p_done)))
    end = int(ended[0]) if ended.size else None  # the dream's last step (it still counts)
    err = np.asarray(rec["pixel_error"], np.float64)[:length]
    err_top = max(float(err.max()), 1e-6)
    conf = rec.get("dream_confidence")
    font = _font()
    plot_x0, plot_x1 = PAD + 40, width - PAD
    plot_y0 = TITLE_H + size + CAPTION_H + PAD
    plot_y1 = height - PAD
    xs = plot_x0 + (plot_x1 - plot_x0) * np.arange(length) / max(length - 1, 1)
    ys = plot_y1 - (plot_y1 - plot_y0) * err / err_top
    line = list(zip(xs.tolist(), ys.tolist()))

    base = Image.new("RGB", (width, height), (255, 255, 255))  # what every frame shares
    draw = ImageDraw.Draw(base)
    draw.text((PAD, plot_y0), "pixel", fill=GRAY, font=font)
    draw.text((PAD, plot_y0 + 12), "error", fill=GRAY, font=font)
    draw.rectangle((plot_x0, plot_y0, plot_x1, plot_y1), outline=LIGHT)
    if len(line) > 1:
        draw.line(line, fill=BLUE, width=1)
    if end is not None:
        draw.line([(xs[end], plot_y0), (xs[end], plot_y1)], fill=RED, width=2)

    for t in range(length):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        dead = end is not None and t > end
        panels = [_panel(np.asarray(rec["real"][t], np.float32) / 255.0), _panel(rec["recon"][t]),
                  _panel(rec["dreamed"][t])]
        if dead:  # after the dream ended: dimmed, what M would have imagined past its own end
            panels[2] = (0.35 * panels[2] + 0.65 * 255).astype(np.uint8)
        titles = ("real", "V reconstruction", "M dream (open loop)" if not dead else f"dream ended at t={end}")
        for i, (panel, title) in enumerate(zip(panels, titles)):
            x = PAD + i * (size + PAD)
            img.paste(Image.fromarray(panel), (x, TITLE_H))
            draw.text((x, 2), title, fill=RED if (i == 2 and dead) else BLACK, font=font)
        head = f"ep {episode}  " if episode is not None else ""
        real_line = f"{head}t={t}  action {_action_text(rec['action'][t], names)}  real reward {float(rec['reward'][t]):.2f}"
        dream_line = f"dream: reward {float(rec['dream_reward'][t]):.2f}  p(done) {p_done[t]:.2f}"
        if conf is not None:
            dream_line += f"  K confidence {float(conf[t]):.2f}"
        dream_line += f"  pixel error {err[t]:.3f}"
        y = TITLE_H + size + 4
        draw.text((PAD, y), real_line, fill=BLACK, font=font)
        draw.text((PAD, y + 14), dream_line, fill=NAVY, font=font)
        draw.line([(xs[t], plot_y0), (xs[t], plot_y1)], fill=BLACK, width=1)
        yield np.asarray(img)


def _palette():
    """256 colours: the grays of the frames and the caption's few colours (no per-frame quantizing)."""
    from PIL import Image

    colours = [(int(g), int(g), int(g)) for g in np.linspace(0, 255, 250).round()]
    colours += [RED, NAVY, BLUE]
    flat = [c for rgb in colours for c in rgb]
    pal = Image.new("P", (1, 1))
    pal.putpalette(flat + [0] * (768 - len(flat)))
    return pal


def write(path: Path | str, frames: Iterable[np.ndarray], fps: int = 25) -> int:
    """Write frames (each uint8[H, W, 3], any iterable) as a looping GIF, atomically: a crash
    leaves the old file or the new one. Returns the number of frames."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"{path}: a video is written as an animated .gif, got {path.suffix or 'no extension'!r}")
    if not 1 <= fps <= MAX_FPS:
        raise ValueError(f"fps must be in 1..{MAX_FPS} (GIF viewers slow faster frames down), got {fps}")
    pal = _palette()
    images = [Image.fromarray(np.asarray(f, np.uint8)).quantize(palette=pal, dither=Image.Dither.NONE) for f in frames]
    if not images:
        raise ValueError(f"{path}: no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.gif")
    try:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(images)


def record(cfg, params: dict[str, Any], key, episodes: int = 1, max_steps: int | None = None) -> Iterator[np.ndarray]:
    """The frames of `episodes` real episodes of the agent in params (with params["verifier"], K's
    confidences too), one after another; episode i uses jax.random.fold_in(key, i)."""
    steps = cfg.eval.max_steps if max_steps is None else max_steps
    for i in range(episodes):
        yield from frames(rollout.open_loop(cfg, params, jax.random.fold_in(key, i), steps), episode=i + 1,
                          names=action_names(cfg))
