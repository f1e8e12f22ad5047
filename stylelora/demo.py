"""`make demo`: the main job on the embedded base, end to end, into one output folder."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from .cli import process_defaults  # light: no torch

process_defaults()  # before torch and transformers load, below

from .base import load_base
from .evaluate import evaluate, heldout_scenes
from .generate import generate_images
from .grid import image_grid
from .world.render import BACKGROUNDS, COLORS, SHAPES


def prompt_grid(pipe, seed: int = 0):
    """Shapes down, colours across (on white): the base's vocabulary at a glance."""
    colors = list(COLORS)
    prompts = [f"a {c} {s} on a white background" for s in SHAPES for c in colors]
    images = generate_images(pipe, prompts, [seed + i for i in range(len(prompts))])
    rows = [images[i * len(colors):(i + 1) * len(colors)] for i in range(len(SHAPES))]
    return image_grid(rows, list(SHAPES), colors), images, prompts


def example_dataset(style: str) -> Path:
    """An example dataset: stylelora/datasets/STYLE in an installed wheel (pyproject ships the
    checkout's datasets/ there), else datasets/STYLE beside the package in a source checkout."""
    here = Path(__file__).resolve().parent
    roots = (here / "datasets", here.parent / "datasets")
    for root in roots:
        if (root / style).is_dir():
            return root / style
    have = sorted({p.name for r in roots if r.is_dir() for p in r.iterdir() if (p / "0001.txt").is_file()})
    raise SystemExit(f"stylelora.demo: error: no example dataset {style!r} (have: {', '.join(have) or 'none'})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--style", default="dots", help="example style to train (datasets/ of the checkout or the installed package)")
    parser.add_argument("--ui", default=os.environ.get("UI", "1") != "0", action=argparse.BooleanOptionalAction,
                        help="end by serving the web UI with the demo adapter (UI=0 skips)")
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

    # The main job: train a style adapter on an example folder, then turn its strength up.
    from .blend import AdapterStack
    from .train import TrainConfig, train
    from .world.render import PALETTES

    dataset = example_dataset(args.style)
    adapters = out / "adapters"
    adapter = adapters / f"{args.style}.safetensors"
    t = time.time()
    train(TrainConfig(dataset=str(dataset), out=str(adapter), run_dir=str(out / "runs" / args.style)))
    print(f"trained {adapter} in {time.time() - t:.0f}s")
    shutil.copy(out / "runs" / args.style / "loss.png", out / "loss.png")
    stack = AdapterStack(pipe)
    stack.add(args.style, adapter)
    strengths = [0.0, 0.25, 0.5, 0.75, 1.0]
    scenes = [s.caption() for s in (heldout_scenes(4, seed=3))]
    rows = [stack.sweep(f"{c}, {args.style}", strengths, seed=i)[0] for i, c in enumerate(scenes)]
    image_grid(rows, [c.removeprefix("a ").replace(" background", "") for c in scenes],
               [f"{s:g}" for s in strengths]).save(out / "strength_grid.png")
    family = "palette" if args.style in PALETTES else "technique"
    hits = {}
    for s in (0.0, 1.0):
        stack.set_scales({args.style: s})
        hits[s] = evaluate(pipe, n=48, triggers=[args.style])[family][args.style]
    print(f"wrote {out / 'strength_grid.png'}; judge calls {hits[0.0]:.0%} of 48 held-out images "
          f"'{args.style}' at strength 0 and {hits[1.0]:.0%} at strength 1")
    print(f"demo output in {out}/")
    stack.reset()
    if args.ui:
        from .cli import main as cli_main

        print("starting the web UI with the demo adapter (Ctrl-C stops it; `make demo UI=0` skips it)")
        cli_main(["ui", "--adapters", str(adapters), "--on", args.style])


if __name__ == "__main__":
    main()
