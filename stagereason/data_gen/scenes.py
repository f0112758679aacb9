"""Procedural scenes: images of shapes (and bar charts) with exact four-stage traces.

Every example is drawn from its own random stream (``seed`` and index), so a
set is deterministic, any example can be rebuilt alone, and a run resumes
without drawing the earlier ones again. Answers are sampled first and the
scene is built to satisfy them, so each question family's answers are
balanced and a model must look at the image: the best guess from the question
text alone stays far below full marks (tested).

Question families: ``count`` (with colour/shape filters), ``attribute``
(colour or shape of a unique object, sometimes multiple choice), ``spatial``
(left/right/above/below, yes/no), ``compare`` (more X than Y, yes/no),
``arithmetic`` (sums of counts) and ``chart`` (bar-chart reading).
"""

from __future__ import annotations

import dataclasses
import random
from operator import attrgetter

from PIL import Image, ImageDraw

from stagereason.stages import StagedTrace

__all__ = ["FAMILIES", "SceneExample", "make_example", "make_examples"]

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 190), "orange": (245, 130, 30), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
FAMILIES = ("count", "attribute", "spatial", "compare", "arithmetic", "chart")
VERSION = 4  # bump when the drawn images or the composed traces change: gen output dirs record it
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# difficulty -> (number of colours, number of shapes, max objects, sizes used)
_LEVELS = {1: (4, 3, 5, ("large",)), 2: (6, 5, 7, ("small", "large")), 3: (7, 6, 9, ("small", "large"))}


@dataclasses.dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def where(self) -> str:
        if (self.row, self.col) == (1, 1):
            return "in the center"
        if self.row == 1:
            return f"on the {COLS[self.col]}"
        if self.col == 1:
            return f"at the {ROWS[self.row]}"
        return f"at the {ROWS[self.row]} {COLS[self.col]}"


@dataclasses.dataclass
class SceneExample:
    """One procedural example: image, question, exact trace and metadata."""

    id: str
    image: Image.Image
    question: str
    answer: str
    trace: StagedTrace
    family: str
    difficulty: int
    choices: dict[str, str] | None = None


def _plural(shape: str, n: int) -> str:
    if n == 1:
        return shape
    return shape + ("es" if shape.endswith(("s", "x", "ss")) else "s")


def _draw_shapes(objs: list[Obj], size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for o in objs:
        r = cell * (0.42 if o.size == "large" else 0.25)
        cx = cell * (o.col + 0.5) + rng.uniform(-0.05, 0.05) * cell
        cy = cell * (o.row + 0.5) + rng.uniform(-0.05, 0.05) * cell
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif o.shape == "star":
            import math

            pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                    cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
            draw.polygon(pts, fill=fill)
        elif o.shape == "cross":
            w = r * 0.35
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def _reading_order(objs: list[Obj]) -> list[Obj]:
    """Row by row, left to right: the order the caption names objects in, and the reasoning walks them."""
    return sorted(objs, key=lambda o: (o.row, o.col))


def _caption(objs: list[Obj]) -> str:
    """Objects in reading order, each named then placed, as the reasoning names them ("a red circle at the top")."""
    ordered = _reading_order(objs)
    sized = len({x.size for x in objs}) > 1
    items = "; ".join(f"a {o.size + ' ' if sized else ''}{o.name} {o.where}" for o in ordered)
    n = len(objs)
    return f"The image shows {n} {'object' if n == 1 else 'objects'} on a white background: {items}."


def _tally(objs: list[Obj], label, match) -> str:
    """Walks the objects in the caption's order: each one's label, then the running count or "no".

    "red 1; green no; red 2": the model decides object by object instead of picking the hits
    out of the caption at once, which a small model learns far sooner (see the README's demo).
    """
    count, steps = 0, []
    for o in _reading_order(objs):
        hit = match(o)
        count += hit
        steps.append(f"{label(o)} {count if hit else 'no'}")
    return "; ".join(steps)


class _Scene:
    """Places objects on a 3x3 grid without overlap."""

    def __init__(self, rng: random.Random, difficulty: int):
        self.rng = rng
        n_colors, n_shapes, self.max_objs, self.sizes = _LEVELS[difficulty]
        self.colors = list(COLORS)[:n_colors]
        self.shapes = list(SHAPES[:n_shapes])
        self.free = [(r, c) for r in range(3) for c in range(3)]
        rng.shuffle(self.free)
        self.objs: list[Obj] = []

    def add(self, color=None, shape=None, cell=None, avoid=lambda o: False) -> Obj:
        for _ in range(200):
            o = Obj(color or self.rng.choice(self.colors), shape or self.rng.choice(self.shapes),
                    self.rng.choice(self.sizes), *(cell or self.free[-1]))
            if not avoid(o):
                break
        else:
            raise RuntimeError("could not place an object")  # pragma: no cover - palettes are large enough
        if cell:
            self.free.remove(cell)
        else:
            self.free.pop()
        self.objs.append(o)
        return o

    def fill(self, k: int, avoid) -> None:
        for _ in range(min(k, len(self.free))):
            self.add(avoid=avoid)


def _count(rng, scene: _Scene):
    kind = rng.choice(("color", "shape", "both"))
    color, shape = rng.choice(scene.colors), rng.choice(scene.shapes)
    target = rng.randint(0, 3)

    def match(o):
        return (kind == "shape" or o.color == color) and (kind == "color" or o.shape == shape)

    for _ in range(target):
        scene.add(color=color if kind != "shape" else None, shape=shape if kind != "color" else None)
    scene.fill(rng.randint(1 if target else 2, max(1, scene.max_objs - target - 1)), avoid=match)
    noun = {"color": f"{color} objects", "shape": _plural(shape, 2), "both": f"{color} {_plural(shape, 2)}"}[kind]
    label = attrgetter({"color": "color", "shape": "shape", "both": "name"}[kind])
    reasoning = f"Looking for {noun}: {_tally(scene.objs, label, match)}. That makes {target}."
    return (f"How many {noun} are there in the image?", str(target),
            f"I will find every one of the {noun} in the image and count them.", reasoning, None)


def _attribute(rng, scene: _Scene):
    ask = rng.choice(("color", "shape"))
    key = rng.choice(scene.shapes if ask == "color" else scene.colors)
    target = scene.add(shape=key) if ask == "color" else scene.add(color=key)
    same = (lambda o: o.shape == key) if ask == "color" else (lambda o: o.color == key)
    scene.fill(rng.randint(1, scene.max_objs - 1), avoid=same)
    answer = target.color if ask == "color" else target.shape
    if ask == "color":
        q, summary = f"What color is the {key}?", f"I will find the {key} and name its color."
    else:
        q, summary = f"What shape is the {key} object?", f"I will find the {key} object and name its shape."
    reasoning = f"There is exactly one {'object shaped as a ' + key if ask == 'color' else key + ' object'}: " \
                f"the {target.name} {target.where}. Its {ask} is {answer}."
    choices = None
    if rng.random() < 0.4:
        pool = scene.colors if ask == "color" else scene.shapes
        others = [p for p in pool if p != answer]
        options = rng.sample(others, min(3, len(others))) + [answer]
        rng.shuffle(options)
        letters = "ABCD"[: len(options)]
        choices = dict(zip(letters, options, strict=True))
        letter = letters[options.index(answer)]
        q += " Choose from: " + " ".join(f"{k}. {v}" for k, v in choices.items())
        reasoning += f" That is option {letter}."
        answer = letter
    return q, answer, summary, reasoning, choices


_RELATIONS = {
    "to the left of": lambda a, b: a.col < b.col, "to the right of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row, "below": lambda a, b: a.row > b.row,
}


def _spatial(rng, scene: _Scene):
    rel = rng.choice(list(_RELATIONS))
    truth = rng.random() < 0.5
    cells = [Obj("", "", "", r, c) for r in range(3) for c in range(3)]
    pairs = [((x.row, x.col), (y.row, y.col)) for x in cells for y in cells
             if x != y and _RELATIONS[rel](x, y) == truth]
    ca, cb = rng.choice(pairs)
    a = scene.add(cell=ca)
    b = scene.add(cell=cb, avoid=lambda o: o.name == a.name)
    unique = {a.name, b.name}
    scene.fill(rng.randint(0, scene.max_objs - 2), avoid=lambda o: o.name in unique)
    verdict = "is" if truth else "is not"
    reasoning = (f"The {a.name} is {a.where} and the {b.name} is {b.where}, "
                 f"so the {a.name} {verdict} {rel} the {b.name}.")
    return (f"Is the {a.name} {rel} the {b.name}? Answer yes or no.", "Yes" if truth else "No",
            f"I will locate the {a.name} and the {b.name} and compare their positions.", reasoning, None)


def _compare(rng, scene: _Scene):
    c1, c2 = rng.sample(scene.colors, 2)
    n1, n2 = rng.sample(range(0, min(5, scene.max_objs // 2 + 2)), 2)
    n1, n2 = min(n1, len(scene.free)), min(n2, len(scene.free) - min(n1, len(scene.free)))
    for _ in range(n1):
        scene.add(color=c1)
    for _ in range(n2):
        scene.add(color=c2)
    scene.fill(rng.randint(0, 2), avoid=lambda o: o.color in (c1, c2))
    truth = n1 > n2
    color = attrgetter("color")
    reasoning = (f"Counting {c1}: {_tally(scene.objs, color, lambda o: o.color == c1)}, so {n1}. "
                 f"Counting {c2}: {_tally(scene.objs, color, lambda o: o.color == c2)}, so {n2}. "
                 f"{n1} is {'more' if truth else 'not more'} than {n2}.")
    return (f"Are there more {c1} objects than {c2} objects? Answer yes or no.", "Yes" if truth else "No",
            f"I will count the {c1} objects and the {c2} objects and compare the two counts.", reasoning, None)


def _arithmetic(rng, scene: _Scene):
    s1, s2 = rng.sample(scene.shapes, 2)
    n1, n2 = rng.randint(0, 3), rng.randint(0, 3)
    if n1 + n2 == 0:
        n1 = 1
    for _ in range(n1):
        scene.add(shape=s1)
    for _ in range(n2):
        scene.add(shape=s2)
    scene.fill(rng.randint(0, 2), avoid=lambda o: o.shape in (s1, s2))
    total = n1 + n2
    tally = _tally(scene.objs, attrgetter("shape"), lambda o: o.shape in (s1, s2))
    reasoning = f"Looking for {_plural(s1, 2)} and {_plural(s2, 2)}: {tally}. That makes {total}."
    return (f"How many {_plural(s1, 2)} and {_plural(s2, 2)} are there in total?", str(total),
            f"I will count the {_plural(s1, 2)} and the {_plural(s2, 2)} together.", reasoning, None)


def _chart(rng, difficulty: int, size: int):
    k = {1: 3, 2: 4, 3: 5}[difficulty]
    colors = rng.sample(list(COLORS), k)
    values = [rng.randint(1, 9) for _ in colors]
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    base, top, left = size * 0.92, size * 0.06, size * 0.08
    unit = (base - top) / 9
    for v in range(0, 10):  # one grid line per unit so values can be read
        y = base - v * unit
        draw.line([(left, y), (size * 0.98, y)], fill=(215, 215, 215) if v else (0, 0, 0), width=1)
    width = (size * 0.9 - left) / k
    for i, (c, v) in enumerate(zip(colors, values, strict=True)):
        x0 = left + i * width + width * 0.15
        draw.rectangle([x0, base - v * unit, x0 + width * 0.7, base], fill=COLORS[c])
    listing = ", ".join(f"{c} {v}" for c, v in zip(colors, values, strict=True))
    caption = f"The image is a bar chart with {k} bars on a grid from 0 to 9. From left to right: {listing}."
    if rng.random() < 0.5 or len(set(values)) != len(values):
        c = rng.choice(colors)
        v = values[colors.index(c)]
        q, a = f"What is the value of the {c} bar in the chart?", str(v)
        summary = f"I will find the {c} bar and read its height against the grid."
        reasoning = f"The {c} bar reaches the grid line {v}, so its value is {v}."
    else:
        best = max(range(k), key=lambda i: values[i])
        q, a = "Which color is the tallest bar in the chart?", colors[best]
        summary = "I will read the height of every bar and find the tallest."
        reasoning = f"The values are {listing}. The largest is {values[best]}, the {colors[best]} bar."
    return img, q, a, summary, caption, reasoning


_BUILDERS = {"count": _count, "attribute": _attribute, "spatial": _spatial, "compare": _compare,
             "arithmetic": _arithmetic}


def make_example(seed: int, index: int, *, difficulty: int = 1, image_size: int = 128,
                 families: tuple[str, ...] = FAMILIES) -> SceneExample:
    """Build example ``index`` of the set drawn with ``seed`` (same arguments, same example).

    Args:
        seed: the set's seed.
        index: position in the set; each index has its own random stream.
        difficulty: 1 (few objects, colours and shapes, one size) to 3 (up to
            nine objects, seven colours, six shapes, two sizes, five bars).
        image_size: side of the square image in pixels.
        families: question families to draw from (uniformly).

    Raises:
        ValueError: unknown difficulty or family.
    """
    if difficulty not in _LEVELS:
        raise ValueError(f"difficulty must be 1, 2 or 3, got {difficulty}")
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        raise ValueError(f"unknown question families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    rng = random.Random(f"stagereason-scenes/{seed}/{index}")
    family = rng.choice(tuple(families))
    if family == "chart":
        image, question, answer, summary, caption, reasoning = _chart(rng, difficulty, image_size)
        choices = None
    else:
        scene = _Scene(rng, difficulty)
        question, answer, summary, reasoning, choices = _BUILDERS[family](rng, scene)
        image = _draw_shapes(scene.objs, image_size, rng)
        caption = _caption(scene.objs)
    trace = StagedTrace(summary=summary, caption=caption, reasoning=reasoning, conclusion=answer)
    return SceneExample(id=scene_id(seed, index), image=image, question=question, answer=answer,
                        trace=trace, family=family, difficulty=difficulty, choices=choices)


def scene_id(seed: int, index: int) -> str:
    """The id of example ``index`` of the set drawn with ``seed``, known without drawing it."""
    return f"synth-{seed}-{index:07d}"


def make_examples(n: int, seed: int = 0, **kwargs) -> list[SceneExample]:
    """The first ``n`` examples of the set drawn with ``seed`` (see :func:`make_example`)."""
    return [make_example(seed, i, **kwargs) for i in range(n)]
