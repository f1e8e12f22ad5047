"""The shapes world: a seeded renderer of one shape per image, in two orthogonal style families.

Content (what is drawn) and style (how) are independent:
  content   = shape × colour × background colour × size × position × rotation
  palette   = how colour is treated   (flat | pastel | neon | sepia)
  technique = how the shape is drawn  (flat | outline | stripes | pixel | dots)
Any palette × technique pair renders, so stacking a palette adapter on a technique adapter
has a measurable target. Every palette keeps hues tellable apart, so the judge can still read
the intended colour of a styled image.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 210, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "gray": (170, 170, 170),
    "beige": (235, 220, 190),
    "mint": (190, 235, 210),
}
PALETTES = ("flat", "pastel", "neon", "sepia")
TECHNIQUES = ("flat", "outline", "stripes", "pixel", "dots")

SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges without a rasteriser of our own


@dataclass(frozen=True)
class Scene:
    """What is in the picture. Sizes and positions are fractions of the image side."""

    shape: str
    color: str
    background: str
    size: float = 0.6  # diameter of the shape's bounding circle
    cx: float = 0.5
    cy: float = 0.5
    rotation: float = 0.0  # degrees; ignored for circles

    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def sample_scene(rng: np.random.Generator, shape=None, color=None, background=None) -> Scene:
    """A random scene; fixed fields are kept. Size and position keep the shape fully inside."""
    size = float(rng.uniform(0.5, 0.78))
    margin = size / 2 + 0.04
    return Scene(
        shape=shape or SHAPES[rng.integers(len(SHAPES))],
        color=color or list(COLORS)[rng.integers(len(COLORS))],
        background=background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        size=size,
        cx=float(rng.uniform(margin, 1 - margin)),
        cy=float(rng.uniform(margin, 1 - margin)),
        rotation=float(rng.uniform(-15, 15)),
    )


def parse_style(name: str) -> tuple[str, str]:
    """'neon' -> ('neon','flat'); 'stripes' -> ('flat','stripes'); 'neon+stripes' -> both."""
    palette, technique = "flat", "flat"
    for part in name.split("+"):
        if part in PALETTES and part != "flat":
            palette = part
        elif part in TECHNIQUES and part != "flat":
            technique = part
        elif part != "flat":
            raise ValueError(
                f"unknown style {part!r} in {name!r}: use 'flat', a palette {PALETTES[1:]}, "
                f"a technique {TECHNIQUES[1:]}, or 'PALETTE+TECHNIQUE'"
            )
    return palette, technique


def style_name(palette: str, technique: str) -> str:
    parts = [p for p in (palette, technique) if p != "flat"]
    return "+".join(parts) or "flat"


def styled_caption(scene: Scene, palette: str = "flat", technique: str = "flat") -> str:
    """Caption with the style's trigger words as the last tags: 'a red star on a white background, neon'.

    Last, not first (kohya's habit): the base's text encoder has position embeddings and never saw
    a style word, so a leading trigger shifts every content word and the base then draws the
    wrong colour for ~60% of held-out prompts (measured); a trailing one leaves them untouched."""
    triggers = [p for p in (palette, technique) if p != "flat"]
    return ", ".join([scene.caption()] + triggers)


def _polygon(scene: Scene, px: float) -> list[tuple[float, float]]:
    r = scene.size * px / 2
    if scene.shape == "square":
        pts = [(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)]
    elif scene.shape == "triangle":
        pts = [(np.cos(a), np.sin(a) + 0.15) for a in np.radians([-90, 30, 150])]
    elif scene.shape == "star":
        angles = np.radians(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = [(rr * np.cos(a), rr * np.sin(a) + 0.05) for a, rr in zip(angles, radii)]
    elif scene.shape == "cross":
        w = 0.32
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
               (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)]
        pts = [(x * 0.9, y * 0.9) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {SHAPES}")
    t = np.radians(scene.rotation)
    c, s = np.cos(t), np.sin(t)
    cx, cy = scene.cx * px, scene.cy * px
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def shape_mask(scene: Scene, size: int = 64) -> np.ndarray:
    """Anti-aliased coverage of the shape, float32 in [0, 1], shape (size, size)."""
    px = size * SUPERSAMPLE
    img = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(img)
    if scene.shape == "circle":
        r = scene.size * px / 2 * 0.85
        cx, cy = scene.cx * px, scene.cy * px
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_polygon(scene, px), fill=255)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _palette_colors(palette: str, fg, bg):
    fg, bg = np.array(fg, np.float32), np.array(bg, np.float32)
    white = np.full(3, 255.0, np.float32)
    if palette == "flat":
        return fg, bg
    if palette == "pastel":
        return 0.45 * fg + 0.55 * white, 0.35 * bg + 0.65 * white
    if palette == "neon":
        h, _, _ = colorsys.rgb_to_hsv(*(fg / 255))
        bright = np.array(colorsys.hsv_to_rgb(h, 0.9, 1.0), np.float32) * 255
        return bright, 0.12 * bg + np.array([8, 8, 20], np.float32)
    if palette == "sepia":
        def tone(c):
            lum = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
            sep = np.array([lum * 1.07 + 20, lum * 0.9 + 10, lum * 0.7], np.float32)
            return np.clip(0.5 * c + 0.5 * sep, 0, 255)
        return tone(fg), tone(bg)
    raise ValueError(f"unknown palette {palette!r}; known: {PALETTES}")


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """Outline band of a coverage mask: mask minus its erosion (MinFilter is a grey erosion)."""
    img = Image.fromarray((mask * 255).astype(np.uint8))
    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1)), np.float32) / 255
    return np.clip(mask - eroded, 0, 1)


def render(scene: Scene, palette: str = "flat", technique: str = "flat", size: int = 64) -> Image.Image:
    """Draw `scene` in the given style. Deterministic: the same arguments give the same pixels."""
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; known: {PALETTES}")
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; known: {TECHNIQUES}")
    fg, bg = _palette_colors(palette, COLORS[scene.color], BACKGROUNDS[scene.background])
    mask = shape_mask(scene, size)  # (H, W)
    unit = size / 64  # style features are sized for 64 px and scale with the image
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    if technique == "outline":
        cover = _ring(mask, max(1, round(3 * unit)))
    elif technique == "stripes":
        period = 10 * unit
        band = ((xx + yy) % period) < period / 2  # diagonal stripes
        cover = mask * band
    elif technique == "dots":
        step = 8 * unit
        dx = (xx % step) - step / 2 + 0.5
        dy = (yy % step) - step / 2 + 0.5
        cover = mask * ((dx**2 + dy**2) <= (2.6 * unit) ** 2)
    else:
        cover = mask

    if palette == "neon":  # glow: the shape's colour bleeds softly into the dark background
        glow = Image.fromarray((cover * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3 * unit))
        glow = np.asarray(glow, np.float32) / 255
        cover = np.maximum(cover, np.clip(glow * 0.9, 0, 1) * (1 - mask) + cover)
        cover = np.clip(cover, 0, 1)

    img = bg[None, None, :] * (1 - cover[..., None]) + fg[None, None, :] * cover[..., None]

    if palette == "sepia":  # darkened corners: an old-photo look the judge can see anywhere
        r2 = ((xx / size - 0.5) ** 2 + (yy / size - 0.5) ** 2) / 0.5
        img = img * (1 - 0.35 * r2[..., None])
    if technique == "pixel":  # 4x4-pixel blocks of the block mean colour (8 px hid small shapes)
        block = max(1, round(4 * unit))
        n = size // block
        small = img[: n * block, : n * block].reshape(n, block, n, block, 3).mean(axis=(1, 3))
        img = np.repeat(np.repeat(small, block, axis=0), block, axis=1)

    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def render_batch(n: int, seed: int, palette="flat", technique="flat", size=64, combos=None):
    """n seeded (scene, image) pairs. `combos` restricts (shape, color, background) triples."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if combos is not None:
            shape, color, background = combos[rng.integers(len(combos))]
            scene = sample_scene(rng, shape, color, background)
        else:
            scene = sample_scene(rng)
        out.append((scene, render(scene, palette, technique, size)))
    return out


def _combos(heldout: bool) -> list[tuple[str, str, str]]:
    # Every 5th (shape, colour, background) triple is never shown to the base in pretraining:
    # prompts from these test whether the base composes content it learned separately.
    out = []
    for i, s in enumerate(SHAPES):
        for j, c in enumerate(COLORS):
            for k, b in enumerate(BACKGROUNDS):
                if ((i + 2 * j + k) % 5 == 0) == heldout:
                    out.append((s, c, b))
    return out


TRAIN_COMBOS = _combos(heldout=False)
HELDOUT_COMBOS = _combos(heldout=True)
