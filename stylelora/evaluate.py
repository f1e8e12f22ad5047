"""Score a pipeline with the judge on prompts whose content the base never saw in pretraining:
the held-out prompts, the judge's verdicts against them, and evaluate() that runs both."""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from .config import MODES
from .generate import generate_images
from .world.judge import judge_images, judge_log_probs
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


def evaluate(pipe, n: int = 120, seed: int = 0, triggers: list[str] = (), stack=None, mode: str | None = None,
             intensity: bool = False, **gen_kwargs) -> dict:
    """Generate n held-out prompts (with the trigger words as trailing tags, as the example
    datasets caption them) and score them. With an AdapterStack, its adapters combine by `mode`
    (default: the stacking default); the result then names the mode and, under "both", the fraction
    of images showing every shapes-world style among the trigger words; with `intensity`, also each
    such style's intensity (style_intensity; costs two more generations per prompt)."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a whole number >= 1 (the number of prompts to judge), got {n!r}")
    scenes = heldout_scenes(n, seed)
    prompts = [", ".join([s.caption(), *triggers]) for s in scenes]
    images = stack_images(stack, pipe, prompts, [seed + i for i in range(n)], mode, **gen_kwargs)
    result = score(images, scenes, per_image=True)
    per_image = result.pop("per_image")
    if stack is None:
        return result
    result |= {"mode": mode or MODES[0], "both": both_rate(per_image, list(triggers))}
    if intensity:
        result["intensity"] = stack_intensity(stack, pipe, prompts, images, seed, mode, list(triggers), **gen_kwargs)
    return result


def stack_intensity(stack, pipe, prompts, images, seed: int, mode, styles: list[str], **gen_kwargs) -> dict:
    """style_intensity of `images` for each shapes-world style among `styles`: the same prompts and
    seeds are generated again with every adapter at 0 and every adapter at strength 1."""
    seeds, stored = [seed + i for i in range(len(prompts))], dict(stack.scales)
    ends = {}
    try:
        for end in (0.0, 1.0):
            stack.set_scales({n: {"unet": end, "text_encoder": end, "blocks": s.blocks} for n, s in stored.items()})
            ends[end] = stack_images(stack, pipe, prompts, seeds, mode, **gen_kwargs)
    finally:
        stack.set_scales(stored)
    return {st: style_intensity(images, ends[0.0], ends[1.0], st) for st in styles if family_of(st)}


def stack_images(stack, pipe, prompts: list[str], seeds: list[int], mode: str | None = None, **gen_kwargs) -> list:
    """One image per (prompt, seed) with the stack's adapters combined by `mode`: batched through the
    plain pipeline where the mode is fused into the weights, else one generate() call per image."""
    if stack is None:
        return generate_images(pipe, prompts, seeds, **gen_kwargs)
    mode = mode or MODES[0]
    if mode in ("merge", "balanced"):
        with stack.fused(mode):
            return generate_images(pipe, prompts, seeds, **gen_kwargs)
    return [stack.generate(p, seed=s, mode=mode, **gen_kwargs) for p, s in zip(prompts, seeds)]


def family_of(style: str) -> str | None:
    """'palette' or 'technique' for a style of the shapes world (not 'flat'), else None."""
    return "palette" if style in PALETTES[1:] else "technique" if style in TECHNIQUES[1:] else None


def style_intensity(images, at_zero, at_one, style: str) -> float:
    """How much of a style an image shows, 0 (like strength 0) .. 1 (like strength 1), in the judge's
    eyes. Per image, the judge's log-probabilities over the style's family (e.g. all palettes) are
    projected onto the line from the same seed's image at strength 0 to its image at strength 1;
    the projections are pooled over images as sum <x - x0, x1 - x0> / sum |x1 - x0|^2, so images an
    adapter does not change (|x1 - x0| ~ 0) carry no weight instead of dividing by ~0."""
    head = family_of(style)
    if head is None:
        raise ValueError(f"{style!r} is not a style of the shapes world: intensity is measured by its judge")
    x, x0, x1 = (judge_log_probs(ims)[head] for ims in (images, at_zero, at_one))
    d = x1 - x0  # (n_images, n_labels)
    return float(((x - x0) * d).sum() / (d * d).sum().clamp_min(1e-12))


def both_rate(per_image: dict[str, list[str]], styles: list[str]) -> float | None:
    """Fraction of images judged to show every shapes-world style in `styles` (a palette and a
    technique at most: one image has one of each). None when no style is a shapes-world style."""
    wanted = {family_of(s): s for s in styles if family_of(s)}
    if not wanted:
        return None
    n = len(next(iter(per_image.values())))
    return sum(all(per_image[f][i] == s for f, s in wanted.items()) for i in range(n)) / n
