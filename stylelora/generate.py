"""Images from a pipeline: one per (prompt, seed), batched, the same images plain diffusers gives.
Used by training's sample grids, evaluation and the demo; the judge is not involved."""

from __future__ import annotations

import torch
from PIL import Image

from .base import native_size
from .config import DEFAULT_GUIDANCE, DEFAULT_STEPS, check_generation


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, negative: str | None = None,
                    size: tuple[int, int] | None = None, batch: int = 32) -> list[Image.Image]:
    """One image per (prompt, seed). Seed s means torch.Generator('cpu').manual_seed(s), as in
    plain diffusers, so a batch gives the same images as one call per prompt. Out-of-range steps,
    guidance or seeds are a ValueError naming them (check_generation)."""
    check_generation(steps=steps, guidance=guidance)
    for s in seeds:
        check_generation(seed=s)
    width, height = size or (native_size(pipe),) * 2
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch]]
        out = pipe(prompt=chunk, negative_prompt=[negative or ""] * len(chunk), generator=gens,
                   num_inference_steps=steps, guidance_scale=guidance, width=width, height=height)
        images += out.images
    return images
