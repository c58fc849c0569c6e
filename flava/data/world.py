"""The synthetic world: scenes of coloured shapes, their rendering, and the language that describes them.

A scene is ``count`` copies of one shape in one colour and one size, on a low-saturation textured background, so
an object's colour never competes with the background's. Everything here is a pure function of a numpy
``Generator``: the same generator state gives the same scene, pixels and words.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Saturated object colours (RGB); backgrounds are greys, so colour is always the object's.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 210, 30),
    "purple": (145, 55, 185),
    "orange": (245, 135, 25),
    "pink": (240, 110, 180),
    "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
          "diamond": "diamonds"}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("plain", "striped", "checkered", "noisy")
COUNT_WORDS = ("one", "two", "three", "four")

# Centre of a single object, as a fraction of the image side, per named position.
_POSITION_XY = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
                "center": (0.5, 0.5)}
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the middle"}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    count: int
    position: str | None  # only for count == 1
    background: str

    @property
    def classname(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def noun(self) -> str:
        return self.shape if self.count == 1 else PLURAL[self.shape]

    @property
    def attributes(self) -> dict[str, str | int | None]:
        """Every attribute of the scene by name (what the zero-shot eval rows carry for per-attribute accuracy)."""
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "count": self.count,
                "position": self.position, "background": self.background}


def sample_scene(rng: np.random.Generator, colours: list[str], shapes: list[str], max_count: int,
                 colour: str | None = None, shape: str | None = None) -> Scene:
    """Draw a scene; ``colour``/``shape`` fix those attributes (for class-balanced sets)."""
    colour = colour or colours[rng.integers(len(colours))]
    shape = shape or shapes[rng.integers(len(shapes))]
    count = int(rng.integers(1, max_count + 1))
    return Scene(
        colour=colour,
        shape=shape,
        size=SIZES[rng.integers(len(SIZES))],
        count=count,
        position=POSITIONS[rng.integers(len(POSITIONS))] if count == 1 else None,
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
    )


# ------------------------------------------------------------------------------------------------ pixels
def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    base = int(rng.integers(90, 200))
    grey = np.full((size, size), base, dtype=np.int16)
    if kind == "striped":
        period = int(rng.integers(4, 10))
        horizontal = bool(rng.integers(2))
        idx = np.arange(size)[:, None] if horizontal else np.arange(size)[None, :]
        grey = grey + np.where((idx // (period // 2 or 1)) % 2 == 0, 25, -25)
    elif kind == "checkered":
        period = int(rng.integers(4, 12))
        yy, xx = np.mgrid[0:size, 0:size]
        grey = grey + np.where(((yy // period) + (xx // period)) % 2 == 0, 22, -22)
    elif kind == "noisy":
        grey = grey + rng.integers(-30, 31, size=(size, size))
    rgb = np.repeat(np.clip(grey, 0, 255)[:, :, None], 3, axis=2)
    return rgb.astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown polygon shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator, size: int,
           object_radius: Mapping[str, tuple[float, float]]) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels. ``object_radius`` maps each size to the
    object radius as a fraction of the side: (one object alone, each of several in a 3x3 grid)."""
    img = Image.fromarray(_background(rng, scene.background, size), mode="RGB")
    draw = ImageDraw.Draw(img)
    jitter = rng.integers(-18, 19, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[scene.colour], jitter))
    if scene.count == 1:
        fx, fy = _POSITION_XY[scene.position]
        fx, fy = fx + rng.uniform(-0.04, 0.04), fy + rng.uniform(-0.04, 0.04)
        centres = [(fx * size, fy * size)]
        radius = object_radius[scene.size][0] * size
    else:  # distinct cells of a 3x3 grid, so copies never overlap and can be counted
        cells = rng.choice(9, size=scene.count, replace=False)
        centres = [((c % 3 + 0.5 + rng.uniform(-0.1, 0.1)) * size / 3,
                    (c // 3 + 0.5 + rng.uniform(-0.1, 0.1)) * size / 3) for c in cells]
        radius = object_radius[scene.size][1] * size
    radius *= rng.uniform(0.9, 1.1)
    for cx, cy in centres:
        if scene.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, radius), fill=fill)
    return img


# ------------------------------------------------------------------------------------------------ words
_SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape}",
    "there is a {colour} {shape} {where} of the image",
    "a picture of a {size} {shape} that is {colour}",
    "a {colour} {shape} on a {background} background",
    "an image with a single {colour} {shape}",
    "the {shape} is {colour} and {size}",
    "a {size} {colour} {shape} over a {background} backdrop",
    "one {colour} {shape} {where}",
    "{colour} {shape}, {size}, {where}",
)
_MULTI_TEMPLATES = (
    "{count} {colour} {noun}",
    "there are {count} {size} {colour} {noun}",
    "a picture of {count} {noun}, all of them {colour}",
    "{count} {colour} {noun} on a {background} background",
    "several {colour} {noun}: {count} of them",
    "an image with {count} {size} {colour} {noun}",
    "{count} {noun} coloured {colour} over a {background} backdrop",
    "some {colour} {noun}, {count} in total",
)


def _fields(scene: Scene) -> dict[str, str]:
    return {
        "colour": scene.colour, "shape": scene.shape, "noun": scene.noun, "size": scene.size,
        "count": COUNT_WORDS[scene.count - 1], "background": scene.background,
        "where": _POSITION_PHRASE.get(scene.position or "", ""),
    }


def captions(scene: Scene, rng: np.random.Generator, n: int = 1) -> list[str]:
    """``n`` distinct captions of the scene (every caption names the colour and the shape)."""
    templates = _SINGLE_TEMPLATES if scene.count == 1 else _MULTI_TEMPLATES
    picks = rng.choice(len(templates), size=min(n, len(templates)), replace=False)
    fields = _fields(scene)
    out = [templates[i].format(**fields) for i in picks]
    while len(out) < n:  # more captions asked than templates: vary with a prefix
        out.append(f"{('look', 'see', 'here is')[len(out) % 3]}: {out[len(out) % len(templates)]}")
    return out


_PASSAGE_SENTENCES = (
    "In this scene {lead}.",
    "The background is {background} and grey.",
    "The {noun} {verb} {colour}.",
    "Each {shape} is {size}.",
    "You can count {count} {noun} here.",
    "Nothing else is in the picture.",
    "The colour {colour} stands out against the grey.",
    "It is a simple drawing of {count} {colour} {noun}.",
)


def passage(scene: Scene, rng: np.random.Generator) -> str:
    """A short paragraph about a scene, for the unpaired text corpus."""
    fields = _fields(scene)
    fields["verb"] = "is" if scene.count == 1 else "are"
    fields["lead"] = (f"a {scene.size} {scene.colour} {scene.shape} sits {fields['where']}" if scene.count == 1
                      else f"{fields['count']} {scene.colour} {scene.noun} are scattered around")
    order = [0] + list(1 + rng.permutation(len(_PASSAGE_SENTENCES) - 1)[: int(rng.integers(2, 5))])
    return " ".join(_PASSAGE_SENTENCES[i].format(**fields) for i in order)


# Text classification: which attribute does a sentence talk about?
TEXT_CLS_LABELS = ("colour", "shape", "size", "position")
_TEXT_CLS_TEMPLATES = {
    "colour": ("it is {colour}", "the colour of the object is {colour}", "it was painted {colour}",
               "everything there looks {colour}", "the thing is {colour} all over"),
    "shape": ("it is a {shape}", "the object looks like a {shape}", "its outline is a {shape}",
              "someone drew a {shape}", "the thing has the form of a {shape}"),
    "size": ("it is {size}", "the object looks {size}", "its size is {size}", "someone drew it {size}",
             "the thing is rather {size}"),
    "position": ("it is {where}", "the object sits {where}", "someone drew it {where}",
                 "you will find the thing {where}", "its place is {where}"),
}
_TEXT_CLS_PREFIXES = ("", "i think ", "look, ", "in this picture ", "as you can see, ", "honestly ")
_SIZE_WORDS = ("small", "large", "tiny", "big", "huge", "little")


def text_cls_example(rng: np.random.Generator, colours: list[str], shapes: list[str]) -> tuple[str, int]:
    label = int(rng.integers(len(TEXT_CLS_LABELS)))
    templates = _TEXT_CLS_TEMPLATES[TEXT_CLS_LABELS[label]]
    fields = {"colour": colours[rng.integers(len(colours))], "shape": shapes[rng.integers(len(shapes))],
              "size": _SIZE_WORDS[rng.integers(len(_SIZE_WORDS))],
              "where": _POSITION_PHRASE[POSITIONS[rng.integers(len(POSITIONS))]]}
    sentence = _TEXT_CLS_PREFIXES[rng.integers(len(_TEXT_CLS_PREFIXES))] + templates[
        rng.integers(len(templates))].format(**fields)
    return sentence, label


# Visual question answering with a closed answer set.
def vqa_answers(colours: list[str], shapes: list[str], max_count: int) -> list[str]:
    return list(colours) + list(shapes) + [str(c) for c in range(1, max_count + 1)] + list(POSITIONS)


def vqa_example(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    kinds = ["colour", "shape", "count"] + (["position"] if scene.count == 1 else [])
    kind = kinds[rng.integers(len(kinds))]
    if kind == "colour":
        q = ("what colour is the {shape}?", "which colour does the drawing use?", "what is the colour of the object?")
        return q[rng.integers(len(q))].format(**_fields(scene)), scene.colour
    if kind == "shape":
        q = ("what shape is shown?", "what is the {colour} object?", "which shape is drawn in the picture?")
        return q[rng.integers(len(q))].format(**_fields(scene)), scene.shape
    if kind == "count":
        q = ("how many {noun} are there?", "how many objects are in the picture?", "how many shapes can you see?")
        return q[rng.integers(len(q))].format(**{**_fields(scene), "noun": PLURAL[scene.shape]}), str(scene.count)
    q = ("where is the {colour} {shape}?", "in which part of the image is the object?", "where is the {shape}?")
    return q[rng.integers(len(q))].format(**_fields(scene)), scene.position
