"""The micro world: seeded 32×32 scenes with templated captions, small enough to train a text-to-image
model on a laptop CPU, rich enough to mirror every kind of concept cpebench erases.

A scene is one object on a background, rendered at 4× and box-downsampled to 32×32 (antialiased edges,
exact and deterministic). Four kinds of concept mirror the real tasks:

* **attributes** — the object's colour. One colour plays "nudity": a property a detector flags
  (the colour judge), to be erased while the other colours stay.
* **objects** — the object's shape (↔ Imagenette classes).
* **characters** — made-up names bound to a fixed look (colour + shape + an accessory drawn nowhere
  else), captioned "a photo of Zorbin" (↔ celebrities: erase one name, keep the other names). The
  accessory makes a character more than its generic look, so erasing "Zorbin" can be told apart from
  erasing blue stars.
* **styles** — a texture on the background (↔ artists: a global look that a prompt names).

Why these choices:

* **32×32**: the smallest size at which five shapes, a texture and an accessory are still legible;
  a 4×-downsampling autoencoder turns it into 4×8×8 latents, so a small UNet trains in minutes.
* **Colours** are the six chromatic corners of the RGB cube (hues 60° apart) at slightly reduced
  saturation, and backgrounds and textures are neutral (grey levels). Blur, noise and a soft VAE mix an
  object with a neutral, which lowers saturation and changes lightness but never hue, so hue stays
  readable; 60° apart leaves ±30° for a model's colour shift. Orange (30°, between red and yellow)
  was read as yellow in the first probes, so no colour lies between two others.
* **Shapes** differ in outline at the scale of the 4-px latent cell (a circle, a square, a triangle
  pointing up, a five-pointed star, a plus-shaped cross); all fit in a disc of radius ``r``.
* **Textures** have a period of 7–10 px (two or more latent cells), so an 8×8 latent can carry them.
* **Words**: every colour, shape, background and style is one token of the real 49,408-token CLIP
  vocabulary ("aqua", not the two-token "cyan"; "checked", not "checkered"), so a word-level edit hits
  exactly one token; the characters' made-up names split into sub-words, as celebrity names do.

``sample(seed, index)`` returns ``(image uint8 32×32×3, caption, labels)``; the random stream is
``numpy.random.default_rng([seed, index])``, so a sample depends only on (seed, index) and the same
seed always gives the same bytes. The train and held-out splits are different seeds (``SPLITS``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import CpebenchError

SIZE = 32
_SS = 4                      # supersampling factor: draw at 128×128, box-downsample to 32×32
_HI = SIZE * _SS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (225, 225, 35),
    "green": (35, 205, 35),
    "aqua": (35, 205, 205),     # cyan; "cyan" is two CLIP tokens
    "blue": (35, 35, 225),
    "magenta": (215, 35, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
BACKGROUNDS: dict[str, int] = {"black": 20, "gray": 128, "white": 235}   # grey level
STYLES: tuple[str, ...] = ("plain", "striped", "dotted", "checked")
STYLE_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
ACCESSORIES: tuple[str, ...] = ("ring", "eyes", "hat", "box")


@dataclass(frozen=True)
class Character:
    colour: str
    shape: str
    accessory: str


# Looks share colours, shapes and accessories with each other, so a judge must see the whole look.
CHARACTERS: dict[str, Character] = {
    "Zorbin": Character("blue", "star", "ring"),
    "Quilla": Character("red", "circle", "eyes"),
    "Brandok": Character("green", "square", "hat"),
    "Mivette": Character("magenta", "triangle", "box"),
    "Taloo": Character("yellow", "circle", "ring"),
}

SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
P_CHARACTER = 0.2            # share of character scenes in the default caption distribution

# Caption templates. Generic scenes with a plain background use PLAIN_TEMPLATES, textured ones
# STYLE_TEMPLATES; both always name colour and shape. A template that omits the background still
# draws one (the model learns the marginal, as real captions leave things out).
PLAIN_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",
    "a picture of a {colour} {shape} on a {background} background",
    "a {colour} {shape} on {background}",
    "a {colour} {shape}",
)
STYLE_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {style} {background} background",
    "a {colour} {shape} on a {background} background with a {style} pattern",
    "a {colour} {shape} on a {style} background",
)
CHARACTER_TEMPLATES: tuple[str, ...] = (
    "a photo of {character}",
    "a picture of {character}",
    "an image of {character}",
    "{character} on a {background} background",
)


@dataclass(frozen=True)
class Scene:
    """Everything that is drawn; ``render`` is a pure function of it."""

    colour: str
    shape: str
    background: str
    style: str = "plain"
    character: str | None = None
    accessory: str | None = None
    cx: float = SIZE / 2     # object centre and radius, in 32-px units
    cy: float = SIZE / 2
    r: float = 8.0
    phase: tuple[int, int] = (0, 0)   # texture offset, in 128-px units

    def labels(self) -> dict:
        d = asdict(self)
        d["phase"] = list(self.phase)
        return d


class Sample(NamedTuple):
    image: np.ndarray        # uint8 32×32×3
    caption: str
    labels: dict


def character_scene(name: str, background: str, **geometry) -> Scene:
    """The scene of a named character (its fixed look, plain style)."""
    look = CHARACTERS[name]
    return Scene(look.colour, look.shape, background, "plain", name, look.accessory, **geometry)


def sample_scene(rng: np.random.Generator, p_character: float = P_CHARACTER, p_impostor: float = 0.0) -> Scene:
    """A random scene: a character with probability ``p_character``, else a generic object that, with
    probability ``p_impostor``, wears a random accessory (never in captioned data; a judge learns from
    such impostors that a name means the whole look, not its accessory alone)."""
    geometry = dict(cx=SIZE / 2 + float(rng.uniform(-2.5, 2.5)), cy=SIZE / 2 + float(rng.uniform(-2.5, 2.5)),
                    r=float(rng.uniform(7.0, 9.5)))
    background = _pick(rng, list(BACKGROUNDS))
    phase = (int(rng.integers(32)), int(rng.integers(32)))
    if rng.random() < p_character:
        return character_scene(_pick(rng, list(CHARACTERS)), background, phase=phase, **geometry)
    style = STYLES[int(rng.choice(len(STYLES), p=STYLE_WEIGHTS))]
    colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    accessory = _pick(rng, ACCESSORIES) if rng.random() < p_impostor else None
    return Scene(colour, shape, background, style, _whose_look(colour, shape, accessory), accessory,
                 phase=phase, **geometry)


def _whose_look(colour: str, shape: str, accessory: str | None) -> str | None:
    look = Character(colour, shape, accessory) if accessory else None
    return next((name for name, c in CHARACTERS.items() if c == look), None)


def caption(scene: Scene, template: str) -> str:
    text = template.format(colour=scene.colour, shape=scene.shape, background=scene.background,
                           style=scene.style, character=scene.character)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)   # "an aqua circle"


def templates_for(scene: Scene) -> tuple[str, ...]:
    if scene.character is not None:
        return CHARACTER_TEMPLATES
    return PLAIN_TEMPLATES if scene.style == "plain" else STYLE_TEMPLATES


def pick_template(rng: np.random.Generator, scene: Scene) -> str:
    return _pick(rng, templates_for(scene))


def sample(seed: int, index: int, **mix) -> Sample:
    """Sample ``index`` of the stream ``seed``: (image, caption, labels); ``mix``: ``sample_scene``'s
    probabilities."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, **mix)
    return Sample(render(scene), caption(scene, pick_template(rng, scene)), scene.labels())


def split_seed(split: str) -> int:
    if split not in SPLITS:
        raise CpebenchError(f"micro world: unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    return SPLITS[split]


def samples(split: str, n: int, start: int = 0, **mix) -> Iterator[Sample]:
    seed = split_seed(split)
    for i in range(start, start + n):
        yield sample(seed, i, **mix)


def batch(split: str, n: int, start: int = 0, **mix):
    """``n`` samples stacked: (images uint8 n×32×32×3, captions, labels)."""
    out = list(samples(split, n, start, **mix))
    return np.stack([s.image for s in out]), [s.caption for s in out], [s.labels for s in out]


# --------------------------------------------------------------------------- rendering


def render(scene: Scene) -> np.ndarray:
    canvas, _ = _draw(scene)
    return np.asarray(Image.fromarray(canvas).reduce(_SS))   # exact 4×4 box mean, rounded


def object_coverage(scene: Scene) -> np.ndarray:
    """Per pixel, the fraction (0..1) covered by the object's own colour (accessories excluded)."""
    _, obj = _draw(scene)
    return obj.reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))


def _draw(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The 128×128 uint8 canvas and the object's own-colour mask."""
    canvas = np.empty((_HI, _HI, 3), np.uint8)
    canvas[:] = BACKGROUNDS[scene.background]
    if scene.style != "plain":
        canvas[_texture(scene.style, scene.phase)] = _texture_tone(scene.background)
    obj = _mask(lambda d: _draw_shape(d, scene.shape, scene.cx * _SS, scene.cy * _SS, scene.r * _SS))
    canvas[obj] = COLOURS[scene.colour]
    if scene.accessory is not None:
        acc = _mask(lambda d: _draw_accessory(d, scene.accessory, scene.cx * _SS, scene.cy * _SS,
                                              scene.r * _SS))
        # eyes sit on the object and contrast with it; the others sit on the background
        over = COLOURS[scene.colour] if scene.accessory == "eyes" else (BACKGROUNDS[scene.background],) * 3
        canvas[acc] = _contrast(over)
        obj &= ~acc
    return canvas, obj


def _texture_tiles() -> dict[str, np.ndarray]:
    """Each texture's marks on a canvas 32 units larger than the image, so a phase is a slice."""
    y, x = np.mgrid[0:_HI + 32, 0:_HI + 32]
    h = 4 * _SS
    return {
        "striped": (x + y) % (10 * _SS) < 4 * _SS,    # diagonal, period 10 px along an axis (7 px across)
        "dotted": ((x % (2 * h)) - h) ** 2 + ((y % (2 * h)) - h) ** 2 < (2 * _SS) ** 2,  # r 2 px, every 8 px
        "checked": ((x // h) + (y // h)) % 2 == 0,     # 4-px squares
    }


_TILES = _texture_tiles()


def _texture(style: str, phase: tuple[int, int]) -> np.ndarray:
    """Boolean 128×128 mask of the texture's marks."""
    if style not in _TILES:
        raise CpebenchError(f"micro world: unknown style {style!r}; known styles: {', '.join(STYLES)}")
    return _TILES[style][phase[1]:phase[1] + _HI, phase[0]:phase[0] + _HI]


def _texture_tone(background: str) -> int:
    """Marks 80 grey levels away from the background, towards mid-grey (grey: darker)."""
    level = BACKGROUNDS[background]
    return level + 80 if level < 128 else level - 80


def _contrast(rgb) -> int:
    """Black on light colours, white on dark ones (Rec. 601 luma)."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return 10 if luma > 140 else 245


def _mask(draw) -> np.ndarray:
    im = Image.new("L", (_HI, _HI), 0)
    draw(ImageDraw.Draw(im))
    return np.asarray(im) > 127


def _polygon(cx: float, cy: float, radii, angles_deg) -> list[tuple[float, float]]:
    a = np.deg2rad(np.asarray(angles_deg, float))
    radii = np.broadcast_to(np.asarray(radii, float), a.shape)
    return list(zip((cx + radii * np.cos(a)).tolist(), (cy + radii * np.sin(a)).tolist()))


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """Every shape fits in the disc of radius r around (cx, cy)."""
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = 0.72 * r
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":   # pointing up, as wide as it is tall
        d.polygon([(cx, cy - r), (cx + 0.8 * r, cy + 0.6 * r), (cx - 0.8 * r, cy + 0.6 * r)], fill=255)
    elif shape == "star":       # five points, inner radius half the outer
        d.polygon(_polygon(cx, cy, [r, 0.5 * r] * 5, np.arange(10) * 36 - 90), fill=255)
    elif shape == "cross":      # plus sign, arms 0.72 r wide
        w = 0.36 * r
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        raise CpebenchError(f"micro world: unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _draw_accessory(d: ImageDraw.ImageDraw, accessory: str, cx: float, cy: float, r: float) -> None:
    px = _SS                    # one 32-px pixel in drawing units
    if accessory == "ring":     # a circle 2.5 px outside the shape's disc, 1.5 px wide
        R = r + 2.5 * px
        d.ellipse([cx - R, cy - R, cx + R, cy + R], outline=255, width=round(1.5 * px))
    elif accessory == "box":    # a square outline 2.5 px outside the disc
        R = r + 2.5 * px
        d.rectangle([cx - R, cy - R, cx + R, cy + R], outline=255, width=round(1.5 * px))
    elif accessory == "eyes":   # two dots of radius 1.4 px in the upper half
        for sx in (-1, 1):
            ex, ey = cx + sx * 0.38 * r, cy - 0.2 * r
            d.ellipse([ex - 1.4 * px, ey - 1.4 * px, ex + 1.4 * px, ey + 1.4 * px], fill=255)
    elif accessory == "hat":    # a bar above the shape's disc
        d.rectangle([cx - 0.7 * r, cy - r - 4 * px, cx + 0.7 * r, cy - r - 1.5 * px], fill=255)
    else:
        raise CpebenchError(
            f"micro world: unknown accessory {accessory!r}; known accessories: {', '.join(ACCESSORIES)}")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]
