"""`make demo`: the main job on the embedded base, end to end, into one output folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .base import load_base
from .evaluate import evaluate, generate_images
from .grid import image_grid
from .world.render import BACKGROUNDS, COLORS, SHAPES


def prompt_grid(pipe, seed: int = 0):
    """Shapes down, colours across (on white): the base's vocabulary at a glance."""
    colors = list(COLORS)
    prompts = [f"a {c} {s} on a white background" for s in SHAPES for c in colors]
    images = generate_images(pipe, prompts, [seed + i for i in range(len(prompts))])
    rows = [images[i * len(colors):(i + 1) * len(colors)] for i in range(len(SHAPES))]
    return image_grid(rows, list(SHAPES), colors), images, prompts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t = time.time()
    pipe = load_base()
    print(f"loaded the embedded base in {time.time() - t:.2f}s")
    grid, images, prompts = prompt_grid(pipe)
    grid.save(out / "base_prompt_grid.png")
    for i in range(0, len(images), 7):  # a few single images, named by their prompt
        images[i].save(out / f"base_{i:02d}_{prompts[i].replace(' ', '_')}.png")
    print(f"wrote {out / 'base_prompt_grid.png'} ({len(SHAPES)} shapes x {len(COLORS)} colours)")

    t = time.time()
    quality = evaluate(pipe, n=48)
    (out / "base_eval.json").write_text(json.dumps(quality, indent=2))
    print(f"judge on 48 held-out prompts ({time.time() - t:.1f}s): shape {quality['shape_acc']:.0%}, "
          f"colour {quality['color_acc']:.0%}, flat {quality['palette']['flat'] * quality['technique']['flat']:.0%}"
          f" (backgrounds: {', '.join(BACKGROUNDS)})")
    print(f"demo output in {out}/")


if __name__ == "__main__":
    main()
