"""Procedural scenes for the demo data set: coloured shapes on a plain background.

Flow: a seeded generator -> :func:`random_scene` (2-4 objects, each a shape, colour, size and a
distinct cell of a 3x3 grid) -> :func:`render` (drawn at 4x, box-filtered down, so edges are
smooth) -> :func:`scene_captions`: one caption per object, relations between pairs (left of,
above, larger than) and a whole-scene caption; each caption describes a different part of the
image, which is the caption diversity Llip's per-caption mixing is built for.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
COLORS = {
    "red": (220, 38, 38), "green": (34, 160, 60), "blue": (37, 80, 220), "yellow": (240, 205, 25),
    "purple": (135, 55, 185), "orange": (245, 130, 15), "pink": (240, 110, 185), "black": (25, 25, 25),
}
SIZES = {"small": (0.09, 0.11), "large": (0.14, 0.16)}  # radius as a fraction of the image side
BACKGROUNDS = ((248, 248, 248), (236, 236, 230), (250, 244, 232))
CELL_NAMES = ("in the top left corner", "at the top", "in the top right corner",
              "on the left", "in the center", "on the right",
              "in the bottom left corner", "at the bottom", "in the bottom right corner")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major in a 3x3 grid
    cx: float  # center, fraction of the image side
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]


def random_object(rng: np.random.Generator, cell: int, shape: str | None = None,
                  color: str | None = None) -> Obj:
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    color = color or list(COLORS)[int(rng.integers(len(COLORS)))]
    size = ("small", "large")[int(rng.integers(2))]
    radius = float(rng.uniform(*SIZES[size]))
    row, col = divmod(cell, 3)
    slack = max(0.0, 1 / 6 - radius)  # keep the object inside its cell
    cx = (col + 0.5) / 3 + float(rng.uniform(-slack, slack))
    cy = (row + 0.5) / 3 + float(rng.uniform(-slack, slack))
    return Obj(shape, color, size, cell, cx, cy, radius)


def random_scene(rng: np.random.Generator, min_objects: int = 2, max_objects: int = 4) -> Scene:
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    objects = tuple(random_object(rng, int(c)) for c in cells)
    return Scene(objects, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: tuple[float, ...], phase: float) -> list[tuple[float, float]]:
        angles = phase + 2 * np.pi * np.arange(n * len(radii)) / (n * len(radii))
        rs = np.resize(np.array(radii), len(angles))
        return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for rr, a in zip(rs, angles)]

    if shape == "triangle":
        return ring(3, (r,), -np.pi / 2)
    if shape == "diamond":
        return ring(4, (r,), -np.pi / 2)
    if shape == "hexagon":
        return ring(6, (r,), 0.0)
    if shape == "star":
        return ring(5, (r, 0.45 * r), -np.pi / 2)
    if shape == "cross":
        a = 0.35 * r
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
                (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
                (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape '{shape}'")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """RGB image of the scene, ``size`` pixels square."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r, fill = o.cx * big, o.cy * big, o.radius * big, COLORS[o.color]
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "ring":
            draw.ellipse(box, outline=fill, width=max(1, int(0.35 * r)))
        elif o.shape == "square":
            s = 0.85 * r
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return img.reduce(SUPERSAMPLE)


def encode_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0)  # 4:4:4 keeps small shapes' colour
    return buf.getvalue()


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "an orange star", "a red star"."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _object_caption(o: Obj, rng: np.random.Generator) -> str:
    where = CELL_NAMES[o.cell]
    templates = ("{sized} {where}.", "{plain} {where}.", "{sized}.", "there is {plain} {where}.",
                 "{where_cap}, {sized}.")
    t = templates[int(rng.integers(len(templates)))]
    return t.format(sized=f"a {o.size} {o.name}", plain=_a(o.name), where=where,
                    where_cap=where[0].upper() + where[1:])


def _relation_caption(a: Obj, b: Obj, rng: np.random.Generator) -> str | None:
    """A true spatial or size relation between two objects, or None if they share a row and column."""
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    options = []
    if ca != cb:
        options.append("to the left of" if ca < cb else "to the right of")
    if ra != rb:
        options.append("above" if ra < rb else "below")
    if a.size != b.size:
        options.append("larger than" if a.size == "large" else "smaller than")
    if not options:
        return None
    rel = options[int(rng.integers(len(options)))]
    return f"{_a(a.name)} {rel} {_a(b.name)}."


def _scene_caption(scene: Scene) -> str:
    names = [_a(o.name) for o in sorted(scene.objects, key=lambda o: o.cell)]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    n = len(scene.objects)
    return f"{NUMBERS.get(n, str(n))} shape{'s' if n > 1 else ''}: {listing}."


def scene_captions(scene: Scene, rng: np.random.Generator, relations: int = 2,
                   whole_scene: bool = True) -> list[str]:
    """One caption per object, up to ``relations`` relation captions, and (``whole_scene``) one
    caption listing every object. Without it, no caption describes the whole image."""
    caps = [_object_caption(o, rng) for o in scene.objects]
    objs = scene.objects
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j]
    for k in rng.permutation(len(pairs))[:relations]:
        cap = _relation_caption(objs[pairs[k][0]], objs[pairs[k][1]], rng)
        if cap and cap not in caps:
            caps.append(cap)
    if whole_scene:
        caps.append(_scene_caption(scene))
    return caps


def located_caption(o: Obj) -> str:
    """The caption that names one object by all of its attributes: "a small red circle on the left."."""
    return f"a {o.size} {o.name} {CELL_NAMES[o.cell]}."


def class_names() -> list[str]:
    """Zero-shot classes: every colour-shape pair, e.g. "red circle"."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


# Prompts for zero-shot classification, CLIP style ("{}" is the class name).
TEMPLATES = ("a {}.", "a photo of a {}.", "there is a {}.", "a small {}.", "a large {}.",
             "a {} on a plain background.")
