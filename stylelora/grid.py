"""Labelled image grids: prompt grids, style x strength sweeps."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def image_grid(rows: list[list[Image.Image]], row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, scale: int = 2) -> Image.Image:
    """Paste rows of equally sized images into one picture, with optional labels.
    `scale` enlarges tiny images with nearest-neighbour so 64 px pictures stay readable."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    font = ImageFont.load_default()
    left = 8 + max((int(font.getlength(s)) for s in row_labels), default=0) if row_labels else 0
    top = 18 if col_labels else 0
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (left + ncols * (w + 2), top + len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels or []):
        draw.text((left + j * (w + 2) + 2, 3), label, fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + i * (h + 2)
        if row_labels:
            draw.text((4, y + h // 2 - 6), row_labels[i], fill="black", font=font)
        for j, img in enumerate(row):
            grid.paste(img.resize((w, h), Image.Resampling.NEAREST), (left + j * (w + 2), y))
    return grid
