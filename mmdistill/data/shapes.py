"""`shapes`: a procedural image-caption set, built in, deterministic from a seed.

Each image holds one or two coloured shapes of a size at a position; its captions describe the
same scene in different words and orders, so retrieval needs colour, shape, size and position
(compositional) rather than a single cue.
"""

from __future__ import annotations

import random

from datasets.features.image import image_to_bytes
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from mmdistill.data.base import ImageTextSet, split_from_records

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {"grey": (128, 128, 128), "sand": (200, 180, 140), "teal": (40, 120, 120)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "large")


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, box: tuple[float, ...]) -> None:
    x0, y0, x1, y1 = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _box(position: str, size: str, n: int) -> tuple[float, ...]:
    r = n * (0.22 if size == "large" else 0.12)
    cx, cy = {
        "left": (0.25, 0.5),
        "right": (0.75, 0.5),
        "top": (0.5, 0.25),
        "bottom": (0.5, 0.75),
        "centre": (0.5, 0.5),
    }[position]
    return (cx * n - r, cy * n - r, cx * n + r, cy * n + r)


def _phrase(obj: dict, rng: random.Random) -> str:
    words = (
        [obj["size"], obj["colour"], obj["shape"]]
        if rng.random() < 0.6
        else [
            obj["colour"],
            obj["shape"],
        ]
    )
    return " ".join(words)


def _captions(objs: list[dict], bg: str, rng: random.Random, k: int) -> list[str]:
    """k different descriptions of the same scene."""
    caps: list[str] = []
    while len(caps) < k:
        order = objs[:] if rng.random() < 0.5 else objs[::-1]
        parts = [f"a {_phrase(o, rng)} at the {o['position']}" for o in order]
        style = rng.randrange(4)
        if style == 0:
            cap = " and ".join(parts)
        elif style == 1:
            cap = " and ".join(parts) + f" on a {bg} background"
        elif style == 2:
            cap = f"a {bg} picture with " + " and ".join(parts)
        else:
            names = " and ".join(f"a {o['colour']} {o['shape']}" for o in order)
            cap = f"{names} on {bg}"
        if cap not in caps or len(set(caps)) >= 4 * len(objs):
            caps.append(cap)
    return caps


def make_scene(rng: random.Random, n_px: int, k: int) -> tuple[Image.Image, list[str]]:
    bg = rng.choice(list(BACKGROUNDS))
    n_obj = rng.choice((1, 2))
    positions = rng.sample(POSITIONS, n_obj)
    objs = [
        {
            "shape": rng.choice(SHAPES),
            "colour": rng.choice(list(COLOURS)),
            "size": rng.choice(SIZES),
            "position": p,
        }
        for p in positions
    ]
    scale = 4  # draw large, then downsample, for smooth edges
    img = Image.new("RGB", (n_px * scale, n_px * scale), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    for o in objs:
        _draw(draw, o["shape"], o["colour"], _box(o["position"], o["size"], n_px * scale))
    img = img.resize((n_px, n_px), Image.Resampling.LANCZOS)
    return img, _captions(objs, bg, rng, k)


def read_shapes(cfg: DictConfig) -> ImageTextSet:
    """Generate train/val/test scenes; the same seed always gives the same data."""
    splits = {}
    for offset, name in enumerate(("train", "val", "test")):
        rng = random.Random(f"{cfg.seed}-{name}")
        n = int(cfg.split_sizes[offset])
        images, captions = [], []
        for _ in range(n):  # each image is kept as its PNG bytes, not as a decoded image
            image, caps = make_scene(rng, int(cfg.image_size), int(cfg.captions_per_image))
            images.append({"path": None, "bytes": image_to_bytes(image)})
            captions.append(caps)
        ids = [f"{name}-{i:05d}" for i in range(n)]
        splits[name] = split_from_records(
            name,
            ids,
            images,
            captions,
            fingerprint_parts=[f"shapes-v1:{cfg.seed}:{cfg.image_size}:{i}" for i in ids],
        )
    return ImageTextSet(name="shapes", **splits)
