"""The judge: a small CNN that says what a 64x64 shapes-world image shows, and in which style.

It is trained on rendered images only (never on generated ones), so its verdicts on generated
images are an outside opinion. `check()` measures it on fresh renders it has not seen.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .models import Judge
from .render import PALETTES, TECHNIQUES, render_batch

JUDGE_FILE = Path(__file__).parent / "assets" / "judge.safetensors"


def to_tensor(images) -> torch.Tensor:
    """PIL images or uint8 arrays (H, W, 3) -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@lru_cache(maxsize=2)
def load_judge(path: str | Path = JUDGE_FILE) -> Judge:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge weights not found at {path}; rebuild with `stylelora world pretrain`")
    judge = Judge()
    judge.load_state_dict(load_file(path))
    return judge.eval()


@torch.no_grad()
def judge_log_probs(images, judge: Judge | None = None, batch: int = 256) -> dict[str, torch.Tensor]:
    """Per head, the judge's log-probabilities (n_images, n_labels) (images resized to 64x64 when needed)."""
    judge = judge or load_judge()
    images = [im.convert("RGB").resize((64, 64)) if im.size != (64, 64) else im for im in images]
    chunks = [judge(to_tensor(images[i : i + batch])) for i in range(0, len(images), batch)]
    return {k: torch.cat([c[k] for c in chunks]).log_softmax(1) for k in Judge.HEADS}


def judge_images(images, judge: Judge | None = None, batch: int = 256) -> dict[str, list[str]]:
    """Predicted label per head for each image (resized to 64x64 when needed)."""
    log_probs = judge_log_probs(images, judge, batch)
    return {k: [labels[j] for j in log_probs[k].argmax(1).tolist()] for k, labels in Judge.HEADS.items()}


def check(n_per_style: int = 40, seed: int = 10_000_000, judge: Judge | None = None) -> dict[str, float]:
    """Per-head accuracy on fresh renders of every palette x technique pair."""
    truth: dict[str, list[str]] = {k: [] for k in Judge.HEADS}
    images = []
    for i, (p, t) in enumerate((p, t) for p in PALETTES for t in TECHNIQUES):
        for scene, img in render_batch(n_per_style, seed + i, p, t):
            images.append(img)
            truth["shape"].append(scene.shape)
            truth["color"].append(scene.color)
            truth["palette"].append(p)
            truth["technique"].append(t)
    pred = judge_images(images, judge)
    return {k: float(np.mean([a == b for a, b in zip(pred[k], truth[k])])) for k in Judge.HEADS}
