"""Score a pipeline with the judge on prompts whose content the base never saw in pretraining:
the held-out prompts, the judge's verdicts against them, and evaluate() that runs both."""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from .generate import generate_images
from .world.judge import judge_images
from .world.render import HELDOUT_COMBOS, PALETTES, TECHNIQUES, Scene


def heldout_scenes(n: int, seed: int = 0) -> list[Scene]:
    """n prompts cycling through the held-out (shape, colour, background) triples, seeded order."""
    order = np.random.default_rng(seed).permutation(len(HELDOUT_COMBOS))
    return [Scene(*HELDOUT_COMBOS[order[i % len(order)]]) for i in range(n)]


def score(images: list[Image.Image], scenes: list[Scene], per_image: bool = False) -> dict:
    """Judge's verdicts against what the prompts asked for (per_image: also each image's labels,
    for joint rates such as "both stacked styles seen")."""
    pred = judge_images(images)
    n = len(images)
    pal, tech = Counter(pred["palette"]), Counter(pred["technique"])
    return {
        "n": n,
        "shape_acc": sum(p == s.shape for p, s in zip(pred["shape"], scenes)) / n,
        "color_acc": sum(p == s.color for p, s in zip(pred["color"], scenes)) / n,
        "palette": {k: pal[k] / n for k in PALETTES},
        "technique": {k: tech[k] / n for k in TECHNIQUES},
    } | ({"per_image": pred} if per_image else {})


def evaluate(pipe, n: int = 120, seed: int = 0, triggers: list[str] = (), **gen_kwargs) -> dict:
    """Generate n held-out prompts (with the trigger words as trailing tags, as the example
    datasets caption them) and score them."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a whole number >= 1 (the number of prompts to judge), got {n!r}")
    scenes = heldout_scenes(n, seed)
    prompts = [", ".join([s.caption(), *triggers]) for s in scenes]
    images = generate_images(pipe, prompts, [seed + i for i in range(n)], **gen_kwargs)
    return score(images, scenes)
