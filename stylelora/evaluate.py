"""Score a pipeline with the judge on prompts whose content the base never saw in pretraining."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .world.judge import judge_images
from .world.render import HELDOUT_COMBOS, PALETTES, TECHNIQUES, Scene

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0


def heldout_scenes(n: int, seed: int = 0) -> list[Scene]:
    """n prompts cycling through the held-out (shape, colour, background) triples, seeded order."""
    order = np.random.default_rng(seed).permutation(len(HELDOUT_COMBOS))
    return [Scene(*HELDOUT_COMBOS[order[i % len(order)]]) for i in range(n)]


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, negative: str | None = None,
                    size: tuple[int, int] | None = None, batch: int = 32) -> list[Image.Image]:
    """One image per (prompt, seed). Seed s means torch.Generator('cpu').manual_seed(s), as in
    plain diffusers, so a batch gives the same images as one call per prompt."""
    width, height = size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch]]
        out = pipe(prompt=chunk, negative_prompt=[negative or ""] * len(chunk), generator=gens,
                   num_inference_steps=steps, guidance_scale=guidance, width=width, height=height)
        images += out.images
    return images


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
    scenes = heldout_scenes(n, seed)
    prompts = [", ".join([s.caption(), *triggers]) for s in scenes]
    images = generate_images(pipe, prompts, [seed + i for i in range(n)], **gen_kwargs)
    return score(images, scenes)


def parse_adapter_spec(spec: str) -> tuple[str, float, float | None]:
    """'PATH', 'PATH:SCALE' or 'PATH:SCALE:TE_SCALE' -> (path, scale, te_scale or None)."""
    parts = spec.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if any(not math.isfinite(x) for x in numbers):
        raise ValueError(f"adapter scale in {spec!r} is not a finite number: use e.g. "
                         f"{path or 'PATH'}:0.8")
    if not path or (spec.count(":") > len(numbers) and not Path(path).exists()):
        raise ValueError(f"malformed adapter {spec!r}: use PATH, PATH:SCALE or PATH:SCALE:TE_SCALE "
                         "(e.g. pastel.safetensors:0.8)")
    return path, (numbers[0] if numbers else 1.0), (numbers[1] if len(numbers) > 1 else None)
