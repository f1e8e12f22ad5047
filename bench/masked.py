"""Masked loss on the shapes world: does a mask keep an unwanted style out of a style adapter?

    python bench/masked.py [--style dots] [--other sepia] [--n 100] [--out runs/masked]

Builds OUT/data: every image of datasets/STYLE with its left half replaced by the left half of the
same scene in datasets/OTHER (the example datasets share their scenes: all rendered from seed 1),
captioned as STYLE's image is (the other style goes unnamed, as in a real photo whose background is
not the style), with a mask per image in OUT/data/masks that is white on the right half only. Then
trains that folder twice with the default settings, with and without --masked-loss, and scores both
adapters at strength 1 with the judge on held-out prompts (`stylelora eval --adapter A:1 --json`):
how often STYLE shows, and how often OTHER leaks in. Writes bench/results/masked.md.
About 10 min on 2 cores (two default trainings); --build-only stops after writing the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def build(style: str, other: str, out: Path) -> int:
    """The half-and-half dataset in `out` (replaced if it exists); returns the number of images."""
    src, left_src = ROOT / "datasets" / style, ROOT / "datasets" / other
    shutil.rmtree(out, ignore_errors=True)
    (out / "masks").mkdir(parents=True)
    images = sorted(src.glob("*.png"))
    for path in images:
        caption = path.with_suffix(".txt").read_text()
        other_caption = (left_src / path.name).with_suffix(".txt").read_text()
        if caption.rsplit(",", 1)[0] != other_caption.rsplit(",", 1)[0]:  # "a red star on ..., STYLE"
            raise SystemExit(f"{path} and {left_src / path.name} show different scenes: re-render both with "
                             "`stylelora world render --seed 1`")
        img = np.asarray(Image.open(path).convert("RGB")).copy()
        half = img.shape[1] // 2
        img[:, :half] = np.asarray(Image.open(left_src / path.name).convert("RGB"))[:, :half]
        Image.fromarray(img).save(out / path.name)
        (out / path.name).with_suffix(".txt").write_text(caption)
        mask = np.zeros(img.shape[:2], np.uint8)
        mask[:, half:] = 255  # learn from the right half (STYLE) only
        Image.fromarray(mask, "L").save(out / "masks" / path.name)
    return len(images)


def stylelora(*args: str) -> str:
    """Run the stylelora command (one torch thread: two processes share the 2 cores badly)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "stylelora.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"stylelora {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--style", default="dots", help="the style to learn (right half of each image)")
    p.add_argument("--other", default="sepia", help="the unwanted style (left half)")
    p.add_argument("--n", type=int, default=100, help="held-out prompts per adapter")
    p.add_argument("--out", default="runs/masked")
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    n_images = build(args.style, args.other, out / "data")
    print(f"wrote {n_images} images and masks to {out / 'data'}")
    if args.build_only:
        return
    rows = []
    for label, flags in (("without --masked-loss", []), ("with --masked-loss", ["--masked-loss"])):
        adapter = out / f"{'masked' if flags else 'plain'}.safetensors"
        t = time.time()
        stylelora("train", str(out / "data"), "--out", str(adapter), "--no-progress", *flags)
        seconds = time.time() - t
        result = json.loads(stylelora("eval", "--adapter", f"{adapter}:1", "--json", "--n", str(args.n)))
        rows.append((label, seconds, result))
    write_table(args, n_images, rows)


def write_table(args, n_images: int, rows) -> None:
    from stylelora.evaluate import family_of

    fam, other_fam = family_of(args.style), family_of(args.other)
    lines = [f"# Masked loss: {args.style} learnt from images whose left half is {args.other}", "",
             f"`python bench/masked.py --style {args.style} --other {args.other} --n {args.n}` — {n_images} images "
             f"(datasets/{args.style}, left half from datasets/{args.other}, masks white on the right half), "
             f"default training, judged on {args.n} held-out prompts at strength 1 (`stylelora eval --adapter "
             "A:1 --json`).", "",
             f"| training | train (s) | {args.style} (wanted) | {args.other} (leak) | shape | colour |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, seconds, r in rows:
        lines.append(f"| {label} | {seconds:.0f} | {r[fam][args.style]:.0%} | {r[other_fam][args.other]:.0%} | "
                     f"{r['shape_acc']:.0%} | {r['color_acc']:.0%} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "masked.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
