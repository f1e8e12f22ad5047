"""The stacking goal end to end, as the README states it: a palette and a technique adapter,
each trained on its example folder with `targets="attn-ff"` (otherwise default settings), merged
at 1.0 / 1.0, and both styles seen by the judge on held-out prompts."""

from pathlib import Path

import pytest

from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stylelora.evaluate import heldout_scenes, score
from stylelora.train import TrainConfig, train

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


@pytest.mark.slow
def test_attn_ff_adapters_stack_with_both_styles_seen(tmp_path):
    for style in ("pastel", "dots"):
        train(TrainConfig(dataset=str(DATASETS / style), out=str(tmp_path / f"{style}.safetensors"),
                          targets="attn-ff", progress=False))
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    stack = AdapterStack(pipe)
    stack.add("pastel", tmp_path / "pastel.safetensors")
    stack.add("dots", tmp_path / "dots.safetensors")
    scenes = heldout_scenes(48)

    def both_seen() -> float:
        images = [stack.generate(f"{s.caption()}, pastel, dots", seed=i) for i, s in enumerate(scenes)]
        r = score(images, scenes, per_image=True)
        return sum(p == "pastel" and t == "dots"
                   for p, t in zip(r["per_image"]["palette"], r["per_image"]["technique"])) / len(scenes)

    # bench/styles.py measures 96% on 100 prompts (the goal is 70%); here 48 of those prompts
    assert both_seen() >= 0.8
    stack.set_scales({"pastel": 0.0, "dots": 0.0})
    assert both_seen() == 0.0
