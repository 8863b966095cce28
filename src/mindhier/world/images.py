"""Images of the synthetic world: scene parameters, drawing, captions (SPEC §1.3).

A scene is a background (plain colour field, gradient, stripes, checkerboard or noise texture)
plus 1–3 drawn objects from ``CATEGORIES``. Every scene is sampled from its own generator
``default_rng([seed, STREAM_SCENES, index])``, so image ``i`` does not depend on how many images
come before it, and the same seed always gives byte-identical pixels.

Drawing is done at ``SUPERSAMPLE``× the target size with hard edges (PIL polygons, numpy
patterns) and then box-averaged down, which anti-aliases shapes, stripes and checkers alike.

Object 0 of a scene is its *main object*: the largest, drawn last (on top), named first in every
caption; its category is the label the world report decodes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

CATEGORIES = ("disc", "square", "triangle", "star", "ring", "cross",
              "house", "tree", "arrow", "heart", "moon", "diamond")

# Saturated palette; names are the words captions use.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12), "orange": (0.96, 0.55, 0.08), "yellow": (0.96, 0.88, 0.16),
    "green": (0.16, 0.66, 0.20), "cyan": (0.10, 0.80, 0.86), "blue": (0.14, 0.28, 0.86),
    "purple": (0.56, 0.20, 0.76), "pink": (0.96, 0.52, 0.72), "brown": (0.50, 0.30, 0.12),
    "white": (0.96, 0.96, 0.96), "black": (0.07, 0.07, 0.07), "grey": (0.50, 0.50, 0.50),
}
COLOUR_NAMES = tuple(COLOURS)

# Object radius as a fraction of the image side.
SIZES = {"small": 0.12, "medium": 0.17, "large": 0.24}
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "mid-sized"), "large": ("large", "big")}

BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "noise")
TEXTURES = ("plain", "striped", "dotted")
TEXTURE_WORDS = {"plain": "", "striped": "striped ", "dotted": "dotted "}

SUPERSAMPLE = 4
STREAM_SCENES = 0  # first word of every scene's rng seed list after the world seed

# Categories that look wrong upside down only get a small tilt.
_UPRIGHT = {"house", "tree", "heart"}


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    category: str
    colour: str
    size: str
    x: float  # centre, fraction of width (0 left, 1 right)
    y: float  # centre, fraction of height (0 top, 1 bottom)
    rotation: float  # degrees, counter-clockwise on screen
    texture: str

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclasses.dataclass(frozen=True)
class BackgroundSpec:
    kind: str
    colour: str
    colour2: str  # second colour of a gradient; equal to ``colour`` otherwise
    angle: float  # degrees: direction of gradient / stripes
    period: float  # fraction of the image side: stripe / checker period, noise smoothness
    noise_seed: int


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    background: BackgroundSpec
    objects: tuple[ObjectSpec, ...]  # objects[0] is the main (largest) object

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "SceneSpec":
        return SceneSpec(BackgroundSpec(**d["background"]), tuple(ObjectSpec(**o) for o in d["objects"]))


# ---------------------------------------------------------------- sampling

def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM_SCENES, index])


def sample_scene(rng: np.random.Generator) -> SceneSpec:
    """One scene: background, then 1–3 objects placed so that they overlap little."""
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    bg_colour, bg_colour2 = rng.choice(len(COLOUR_NAMES), size=2, replace=False)
    background = BackgroundSpec(
        kind=bg_kind, colour=COLOUR_NAMES[bg_colour],
        colour2=COLOUR_NAMES[bg_colour2] if bg_kind == "gradient" else COLOUR_NAMES[bg_colour],
        angle=float(rng.uniform(0, 180)), period=float(rng.uniform(0.12, 0.3)),
        noise_seed=int(rng.integers(2**31)))
    n_objects = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    sizes = ["large" if rng.random() < 0.6 else "medium"]
    sizes += sorted((("small", "medium")[rng.integers(2)] for _ in range(n_objects - 1)),
                    key=lambda s: -SIZES[s])
    sizes[1:] = [s if SIZES[s] <= SIZES[sizes[0]] else sizes[0] for s in sizes[1:]]
    object_colours = [c for c in COLOUR_NAMES if c not in (background.colour, background.colour2)]
    objects: list[ObjectSpec] = []
    for size in sizes:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
        x, y = _place(rng, SIZES[size], objects)
        max_tilt = 25.0 if category in _UPRIGHT else 180.0
        objects.append(ObjectSpec(
            category=category, colour=object_colours[rng.integers(len(object_colours))], size=size,
            x=x, y=y, rotation=float(rng.uniform(-max_tilt, max_tilt)),
            texture=TEXTURES[rng.choice(3, p=[0.6, 0.2, 0.2])]))
    return SceneSpec(background, tuple(objects))


def _place(rng: np.random.Generator, radius: float, placed: list[ObjectSpec]) -> tuple[float, float]:
    """Centre inside the frame, away from already placed objects (best of 30 tries)."""
    lo, hi = 0.85 * radius, 1 - 0.85 * radius
    best, best_gap = (0.5, 0.5), -np.inf
    for _ in range(30):
        x, y = (float(v) for v in rng.uniform(lo, hi, size=2))
        gap = min((math.hypot(x - o.x, y - o.y) - 0.85 * (radius + o.radius) for o in placed), default=1.0)
        if gap > best_gap:
            best, best_gap = (x, y), gap
        if gap >= 0:
            break
    return best


def sample_scenes(seed: int, n: int) -> list[SceneSpec]:
    return [sample_scene(scene_rng(seed, i)) for i in range(n)]


# ---------------------------------------------------------------- shapes
# Each shape is a list of (value, kind, geometry) drawn in order on a mask: value 1 adds, 0 cuts.
# Geometry lives in object units (radius 1, y pointing down); kind is "poly" (vertex list) or
# "circle" (cx, cy, r).

def _regular(n: int, r: float, phase: float = -90.0) -> list[tuple[float, float]]:
    return [(r * math.cos(math.radians(phase + 360 * k / n)), r * math.sin(math.radians(phase + 360 * k / n)))
            for k in range(n)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, phase=-90 + 36)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart() -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [(float(a) / 17, float(b) / 17 + 0.1) for a, b in zip(x, y)]


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


SHAPES: dict[str, list[tuple[int, str, object]]] = {
    "disc": [(1, "circle", (0.0, 0.0, 0.9))],
    "square": [(1, "poly", _rect(-0.75, -0.75, 0.75, 0.75))],
    "triangle": [(1, "poly", _regular(3, 1.0))],
    "star": [(1, "poly", _star())],
    "ring": [(1, "circle", (0.0, 0.0, 0.95)), (0, "circle", (0.0, 0.0, 0.55))],
    "cross": [(1, "poly", _rect(-0.3, -0.95, 0.3, 0.95)), (1, "poly", _rect(-0.95, -0.3, 0.95, 0.3))],
    "house": [(1, "poly", _rect(-0.7, -0.1, 0.7, 0.85)), (1, "poly", [(-0.9, -0.1), (0.9, -0.1), (0.0, -0.9)]),
              (0, "poly", _rect(-0.18, 0.35, 0.18, 0.85))],
    "tree": [(1, "poly", [(0.0, -1.0), (-0.55, -0.35), (0.55, -0.35)]),
             (1, "poly", [(0.0, -0.65), (-0.75, 0.25), (0.75, 0.25)]),
             (1, "poly", _rect(-0.15, 0.2, 0.15, 0.95))],
    "arrow": [(1, "poly", _rect(-0.95, -0.22, 0.25, 0.22)), (1, "poly", [(0.2, -0.6), (0.95, 0.0), (0.2, 0.6)])],
    "heart": [(1, "poly", _heart())],
    "moon": [(1, "circle", (0.0, 0.0, 0.9)), (0, "circle", (0.45, -0.2, 0.75))],
    "diamond": [(1, "poly", [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)])],
}
assert set(SHAPES) == set(CATEGORIES)


def object_mask(obj: ObjectSpec, canvas: int) -> np.ndarray:
    """Hard-edged boolean mask (canvas, canvas) of one object drawn at its place and rotation."""
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    scale = obj.radius * canvas
    cx, cy = obj.x * canvas, obj.y * canvas
    c, s = math.cos(math.radians(obj.rotation)), math.sin(math.radians(obj.rotation))

    def to_canvas(u: float, v: float) -> tuple[float, float]:
        # rotate counter-clockwise on screen (y points down), then place
        return cx + scale * (c * u + s * v), cy + scale * (-s * u + c * v)

    for value, kind, geom in SHAPES[obj.category]:
        fill = 255 * value
        if kind == "poly":
            draw.polygon([to_canvas(u, v) for u, v in geom], fill=fill)
        else:
            u, v, r = geom
            px, py = to_canvas(u, v)
            draw.ellipse([px - r * scale, py - r * scale, px + r * scale, py + r * scale], fill=fill)
    return np.asarray(img) > 127


# ---------------------------------------------------------------- drawing

def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLOURS[name], dtype=np.float32)


def _pale(rgb: np.ndarray, amount: float = 0.45) -> np.ndarray:
    return (1 - amount) * rgb + amount * np.float32(1.0)


@functools.lru_cache(maxsize=4)
def _coords(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image fractions, shape (canvas, canvas) each (read-only)."""
    t = (np.arange(canvas, dtype=np.float32) + 0.5) / canvas
    x, y = np.meshgrid(t, t, indexing="xy")
    x.flags.writeable = y.flags.writeable = False
    return x, y


def draw_background(bg: BackgroundSpec, canvas: int) -> np.ndarray:
    """(canvas, canvas, 3) float32 background."""
    x, y = _coords(canvas)
    a = math.radians(bg.angle)
    along = x * math.cos(a) + y * math.sin(a)  # coordinate along the pattern direction
    base = _rgb(bg.colour)
    if bg.kind == "plain":
        return np.broadcast_to(0.85 * base + 0.075, (canvas, canvas, 3)).astype(np.float32)
    if bg.kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        return ((1 - t)[..., None] * base + t[..., None] * _rgb(bg.colour2)).astype(np.float32)
    if bg.kind == "stripes":
        on = np.floor(along / bg.period * 2) % 2 == 0
    elif bg.kind == "checker":
        across = -x * math.sin(a) + y * math.cos(a)
        on = (np.floor(along / bg.period * 1.4) + np.floor(across / bg.period * 1.4)) % 2 == 0
    else:  # noise: smoothed white noise, the same texture at every canvas size
        field = np.random.default_rng(bg.noise_seed).standard_normal((64, 64)).astype(np.float32)
        field = gaussian_filter(field, sigma=2.0 + 6 * bg.period, mode="wrap")
        field = (field - field.mean()) / (field.std() + 1e-6)
        field = np.asarray(Image.fromarray(field).resize((canvas, canvas), Image.BILINEAR))
        t = np.clip(0.5 + 0.3 * field, 0, 1)[..., None]
        return (t * base + (1 - t) * _pale(base, 0.7)).astype(np.float32)
    return np.where(on[..., None], base, _pale(base)).astype(np.float32)


def object_fill(obj: ObjectSpec, canvas: int) -> np.ndarray:
    """(canvas, canvas, 3) colour field of an object, with its texture."""
    base = _rgb(obj.colour)
    if obj.texture == "plain":
        return np.broadcast_to(base, (canvas, canvas, 3))
    x, y = _coords(canvas)
    period = 0.45 * obj.radius
    other = 0.55 * base if base.mean() > 0.3 else _pale(base, 0.5)
    if obj.texture == "striped":
        a = math.radians(obj.rotation + 45)
        on = np.floor((x * math.cos(a) + y * math.sin(a)) / period * 2) % 2 == 0
    else:  # dotted: a lattice of dots
        fx = (x - obj.x) / period - np.round((x - obj.x) / period)
        fy = (y - obj.y) / period - np.round((y - obj.y) / period)
        on = fx**2 + fy**2 > 0.09
    return np.where(on[..., None], base, other)


def _block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    h, w = a.shape[0] // factor, a.shape[1] // factor
    return a.reshape(h, factor, w, factor, *a.shape[2:]).mean(axis=(1, 3))


def render_scene(scene: SceneSpec, size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene.

    Returns the image (size, size, 3) float32 in [0, 1] and the *visible* coverage of each
    object (len(objects), grid, grid) in [0, 1] (occlusion by objects drawn later removed),
    which the simulated cortex uses for its shape/category maps.
    """
    canvas = size * SUPERSAMPLE
    if canvas % grid:
        raise ValueError(f"grid {grid} must divide the supersampled canvas {canvas}")
    img = draw_background(scene.background, canvas).copy()
    visible = np.zeros((len(scene.objects), canvas, canvas), dtype=bool)
    for k in reversed(range(len(scene.objects))):  # main object last, on top
        obj = scene.objects[k]
        mask = object_mask(obj, canvas)
        img[mask] = object_fill(obj, canvas)[mask]
        visible[k + 1:] &= ~mask
        visible[k] = mask
    image = np.clip(_block_mean(img, SUPERSAMPLE), 0.0, 1.0).astype(np.float32)
    coverage = _block_mean(visible.transpose(1, 2, 0).astype(np.float32), canvas // grid).transpose(2, 0, 1)
    return image, coverage


# ---------------------------------------------------------------- captions

def _relation(main: ObjectSpec, other: ObjectSpec) -> tuple[str, str]:
    """Where ``main`` is relative to ``other``, and the reverse ("above", "below")."""
    dx, dy = main.x - other.x, main.y - other.y
    if abs(dy) >= abs(dx):
        return ("above", "below") if dy < 0 else ("below", "above")
    return ("to the left of", "to the right of") if dx < 0 else ("to the right of", "to the left of")


def _describe(obj: ObjectSpec, variant: int) -> str:
    return f"{SIZE_WORDS[obj.size][variant]} {TEXTURE_WORDS[obj.texture]}{obj.colour} {obj.category}"


def _background_phrases(bg: BackgroundSpec) -> tuple[str, str]:
    c = bg.colour
    return {
        "plain": (f"a plain {c} background", f"a flat {c} backdrop"),
        "gradient": (f"a {c}-to-{bg.colour2} gradient", f"a background fading from {c} to {bg.colour2}"),
        "stripes": (f"{c} stripes", f"a striped {c} background"),
        "checker": (f"a {c} checkerboard", f"a checkered {c} background"),
        "noise": (f"a noisy {c} texture", f"a mottled {c} background"),
    }[bg.kind]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def captions(scene: SceneSpec) -> list[str]:
    """Four paraphrases built from the scene parameters; all name the main object's category."""
    main, rest = scene.objects[0], scene.objects[1:]
    bg0, bg1 = _background_phrases(scene.background)
    a0, a1 = _article(_describe(main, 0)), _article(_describe(main, 1))
    if not rest:
        return [f"{a0} on {bg0}",
                f"{bg1} behind {a1}",
                f"a picture of {_article(main.colour + ' ' + main.category)} over {bg0}",
                f"{main.category}, {main.colour} and {SIZE_WORDS[main.size][0]}; background: {bg0}"]
    second = rest[0]
    where, back = _relation(main, second)
    others0 = " and ".join(_article(_describe(o, 0)) for o in rest)
    others_short = " and ".join(_article(f"{o.colour} {o.category}") for o in rest)
    extra = "".join(f" and {_article(_describe(o, 1))} nearby" for o in rest[1:])
    return [f"{a0} {where} {others0} on {bg0}",
            f"{bg1} behind {a1}, with {_article(_describe(second, 1))} {back} it{extra}",
            f"a picture of {_article(main.colour + ' ' + main.category)} and {others_short} over {bg0}",
            f"{main.category}, {main.colour} and {SIZE_WORDS[main.size][0]}, {where} {others_short}; "
            f"background: {bg0}"]


def caption_array(scenes: list[SceneSpec], width: int = 5) -> np.ndarray:
    """(N, width) unicode array as NSD's ``COCO_73k_annots_curated.npy``; unused slots are ''."""
    rows = [captions(s) for s in scenes]
    out = np.full((len(scenes), width), "", dtype=f"<U{max(len(c) for r in rows for c in r)}")
    for i, row in enumerate(rows):
        out[i, :len(row)] = row[:width]
    return out
