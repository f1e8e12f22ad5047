"""`make demo`'s main job end to end (the README's first command, without the UI): base grid,
judge, a default training run of the dots example, strength grid, loss curve."""

import re

import pytest
from PIL import Image

from stylelora.adapters import load_adapter


@pytest.mark.slow
def test_demo_writes_its_pictures_and_the_judge_sees_the_style(demo_run):
    out, printed = demo_run  # conftest runs the demo once; the stacking test reuses its dots adapter
    for name in ("base_prompt_grid.png", "strength_grid.png", "loss.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 64 and im.size[1] > 64, name
    adapter = load_adapter(out / "adapters" / "dots.safetensors")
    assert adapter.trigger_words == ["dots"] and adapter.components == {"unet", "text_encoder"}
    at0, at1 = map(int, re.search(r"judge calls (\d+)% .* at strength 0 and (\d+)% at strength 1", printed).groups())
    # bench/styles.py measures dots at 0% / 95% on 100 prompts; the demo scores 48
    assert at0 <= 5 and at1 >= 85, printed
