"""A loss curve as a PNG, drawn with PIL (no plotting library needed for one line chart)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_path


def plot_loss(csv_path: str | Path, png_path: str | Path, size=(640, 360), smooth: int = 5) -> Path:
    """Plot the `loss` column against `step` (raw in grey, moving average in blue)."""
    rows = list(csv.DictReader(Path(csv_path).open()))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 60, 15, 25, 35
    draw.text((left, 6), f"training loss ({Path(csv_path).name})", fill="black", font=font)
    if len(loss) >= 2:
        lo, hi = min(loss), max(loss)
        hi = hi if hi > lo else lo + 1e-9
        x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

        def xy(s, v):
            return (left + (s - x0) / (x1 - x0) * (w - left - right),
                    top + (hi - v) / (hi - lo) * (h - top - bottom))

        avg = [sum(loss[max(0, i - smooth + 1): i + 1]) / len(loss[max(0, i - smooth + 1): i + 1])
               for i in range(len(loss))]
        draw.line([xy(s, v) for s, v in zip(steps, loss)], fill=(190, 190, 190), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, avg)], fill=(30, 90, 200), width=2)
        for v in (lo, (lo + hi) / 2, hi):
            y = xy(x0, v)[1]
            draw.text((4, y - 6), f"{v:.{max(2, 2 - int(math.floor(math.log10(abs(v) + 1e-12))))}f}",
                      fill="black", font=font)
        for s in (x0, (x0 + x1) // 2, x1):
            draw.text((xy(s, lo)[0] - 10, h - bottom + 8), str(s), fill="black", font=font)
    draw.rectangle((left, top, w - right, h - bottom), outline="black")
    with atomic_path(png_path) as tmp:
        img.save(tmp)
    return Path(png_path)
