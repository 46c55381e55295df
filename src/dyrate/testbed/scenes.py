"""Procedural scenes: a few coloured shapes on a 3x3 grid over a lightly textured background.

A scene is a small machine-readable spec (`Scene`): every caption, question and answer of the
testbed is computed from it, and `render` turns it into a PIL image (plus, for training, a
per-pixel object-index map). Everything is deterministic from an integer seed.

The attribute distribution is deliberately *not* uniform: colours and shapes have fixed prior
weights, so that POPE's "popular" negatives (frequent categories) mean something.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

# Attribute vocabularies. Order matters: the prior weights below and the per-patch auxiliary
# labels (index + 1, 0 = background) use it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 190, 20),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES: tuple[str, ...] = ("small", "large")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Prior weights (not normalised). Frequent categories = high colour weight x high shape weight.
COLOUR_WEIGHTS: tuple[float, ...] = (0.26, 0.20, 0.17, 0.14, 0.12, 0.11)
SHAPE_WEIGHTS: tuple[float, ...] = (0.25, 0.21, 0.17, 0.14, 0.12, 0.11)

# 3x3 grid cells, row-major; one word each so that "where is X?" has a one-word answer.
POSITIONS: tuple[str, ...] = (
    "top-left", "top", "top-right",
    "left", "center", "right",
    "bottom-left", "bottom", "bottom-right",
)  # fmt: skip
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient", "stripes", "dots")


@dataclass(frozen=True, order=True)
class SceneObject:
    """One shape. `cell` indexes POSITIONS (row-major 3x3); `dx, dy` is a jitter in [-1, 1]
    of the free space inside the cell."""

    cell: int
    shape: str
    colour: str
    size: str
    dx: float = 0.0
    dy: float = 0.0

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def key(self) -> tuple[str, str, str, str]:
        """(size, colour, shape, position): what a caption says about the object."""
        return (self.size, self.colour, self.shape, self.position)

    @property
    def category(self) -> tuple[str, str]:
        """(colour, shape): the object category of POPE questions."""
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A scene spec. Objects are sorted by cell (reading order)."""

    seed: int
    background: str
    bg_tint: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["bg_tint"] = list(self.bg_tint)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(
            seed=int(d["seed"]),
            background=d["background"],
            bg_tint=tuple(d["bg_tint"]),
            objects=tuple(SceneObject(**o) for o in d["objects"]),
        )


def category_prior() -> dict[tuple[str, str], float]:
    """Probability of each (colour, shape) category for one object, from the prior weights."""
    cw = np.array(COLOUR_WEIGHTS) / sum(COLOUR_WEIGHTS)
    sw = np.array(SHAPE_WEIGHTS) / sum(SHAPE_WEIGHTS)
    return {(c, s): float(cw[i] * sw[j]) for i, c in enumerate(COLOUR_NAMES) for j, s in enumerate(SHAPES)}


def sample_scene(seed: int, max_objects: int = 5) -> Scene:
    """Draw a scene spec from `seed` (same seed -> same scene, on every platform)."""
    rng = random.Random(seed)
    n = rng.randint(1, max_objects)
    cells = sorted(rng.sample(range(9), n))
    objects = []
    for cell in cells:
        objects.append(
            SceneObject(
                cell=cell,
                shape=rng.choices(SHAPES, weights=SHAPE_WEIGHTS)[0],
                colour=rng.choices(COLOUR_NAMES, weights=COLOUR_WEIGHTS)[0],
                size=rng.choice(SIZES),
                dx=round(rng.uniform(-1, 1), 3),
                dy=round(rng.uniform(-1, 1), 3),
            )
        )
    background = rng.choice(BACKGROUNDS)
    base = rng.randint(200, 245)
    tint = tuple(min(255, base + rng.randint(-12, 12)) for _ in range(3))
    return Scene(seed=seed, background=background, bg_tint=tint, objects=tuple(objects))


# ---------------------------------------------------------------- rendering


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """A light, low-information background, (size, size, 3) float32 in 0..255."""
    tint = np.array(scene.bg_tint, dtype=np.float32)
    img = np.broadcast_to(tint, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (size, size) each
    if scene.background == "noise":
        img += rng.normal(0, 10, (size, size, 1))
    elif scene.background == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = math.cos(angle) * xx + math.sin(angle) * yy  # (size, size)
        img += (ramp[..., None] - 0.5) * 40
    elif scene.background == "stripes":
        period = rng.uniform(6, 14) / 96
        img += (np.sin(2 * math.pi * (xx + yy) / period)[..., None] > 0) * -18.0
    elif scene.background == "dots":
        step = int(rng.integers(8, 14) * size / 96) or 2
        mask = ((np.arange(size)[:, None] % step) < max(1, step // 4)) & ((np.arange(size)[None, :] % step) < max(1, step // 4))
        img -= mask[..., None] * 25.0
    return img


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape centred at (cx, cy) with 'radius' r; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.88
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def object_radius(obj: SceneObject, image_size: int) -> float:
    """Half-extent of an object in pixels: large ~ 0.42 of a cell, small ~ 0.24."""
    cell = image_size / 3
    return cell * (0.42 if obj.size == "large" else 0.24)


def render(scene: Scene, image_size: int = 96, with_labels: bool = False):
    """Draw the scene. Returns a PIL RGB image, or (image, labels) where `labels` is a
    (image_size, image_size) uint8 array: 0 = background, i + 1 = scene.objects[i]."""
    rng = np.random.default_rng(scene.seed)
    pixels = _background(scene, image_size, rng)
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    label_img = Image.new("L", (image_size, image_size), 0)
    label_draw = ImageDraw.Draw(label_img)
    cell = image_size / 3
    for i, obj in enumerate(scene.objects):
        r = object_radius(obj, image_size)
        free = cell / 2 - r - 1  # how far the centre may move and stay inside the cell
        row, col = divmod(obj.cell, 3)
        cx = (col + 0.5) * cell + obj.dx * free
        cy = (row + 0.5) * cell + obj.dy * free
        # Small per-object colour jitter so colour is a region, not one exact RGB value.
        jitter = rng.integers(-18, 19, 3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj.colour], jitter))
        pts = _shape_points(obj.shape, cx, cy, r)
        for d, value in ((draw, fill), (label_draw, i + 1)):
            if pts is None:
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value)
            else:
                d.polygon(pts, fill=value)
    # Mild sensor noise over everything.
    arr = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 3, (image_size, image_size, 3))
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if with_labels:
        return image, np.asarray(label_img, dtype=np.uint8)
    return image


def patch_labels(scene: Scene, labels: np.ndarray, patch: int) -> np.ndarray:
    """Per-patch attribute targets for the auxiliary vision loss.

    Returns int64 (P, 4) with P = (H/patch)*(W/patch) in row-major patch order and columns
    (shape, colour, size, cell), each 0 for background or 1 + index into SHAPES / COLOUR_NAMES /
    SIZES / POSITIONS (the grid cell of the object).
    A patch takes the object that covers most of its pixels if that is >= 1/4 of it.
    """
    h, w = labels.shape
    gh, gw = h // patch, w // patch
    # (H, W) -> (gh, patch, gw, patch) -> (gh, gw, patch*patch)
    blocks = labels[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(gh * gw, patch * patch)
    n_obj = len(scene.objects)
    counts = np.stack([(blocks == k).sum(1) for k in range(n_obj + 1)], axis=1)  # (P, n_obj+1)
    counts[:, 0] = 0  # pick among objects only
    best = counts.argmax(1)  # (P,) object index + 1
    covered = counts.max(1) >= (patch * patch) / 4
    table = np.zeros((n_obj + 1, 4), dtype=np.int64)
    for i, o in enumerate(scene.objects):
        table[i + 1] = (SHAPES.index(o.shape) + 1, COLOUR_NAMES.index(o.colour) + 1, SIZES.index(o.size) + 1, o.cell + 1)
    return np.where(covered[:, None], table[best], 0)
