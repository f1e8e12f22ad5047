"""A1111 `<lora:...>` prompt tags in full (issue 16): `<lora:NAME>`, `<lora:NAME:W>`,
`<lora:NAME:TE:UNET>` (A1111's order: text encoder first) and named `te=` / `unet=` weights,
parsed as A1111's Lora network reads them, and through `stylelora generate`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from stylelora.blend import AdapterStack, parse_prompt_loras

from test_blend_cli import PROMPT, files, run  # noqa: F401 -- files is a fixture


@pytest.fixture
def adapters_dir(tmp_path):
    (tmp_path / "pastel.safetensors").write_bytes(b"")  # the parser only checks that the file is there
    return tmp_path


@pytest.mark.parametrize("tag, te, unet", [
    ("<lora:pastel>", 1.0, 1.0),
    ("<lora:pastel:0.8>", 0.8, 0.8),
    ("<lora:pastel:0.25:0.75>", 0.25, 0.75),  # A1111: te first, then unet
    ("<lora:pastel:0:1>", 0.0, 1.0),
    ("<lora:pastel:-1:2.5e-1>", -1.0, 0.25),
    ("<lora:pastel:unet=1:te=0.5>", 0.5, 1.0),
    ("<lora:pastel:te=0.5:unet=1>", 0.5, 1.0),
    ("<lora:pastel:unet=0.3>", 1.0, 0.3),
    ("<lora:pastel:te=0.4>", 0.4, 0.4),  # A1111: unet defaults to te as it stands, named te included
    ("<lora:pastel:0.6:unet=0.2>", 0.6, 0.2),  # a positional number sets both, named ones override
    ("<lora:pastel:te=0.1:0.6>", 0.1, 0.1),  # named wins over positional wherever it stands
    ("<lora:pastel:0.6:0.7:te=0>", 0.0, 0.7),
    ("<lora:pastel:te=1:te=0.5>", 0.5, 0.5),  # A1111: a repeated key, the last one wins
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_form_parses_to_te_and_unet(adapters_dir, tag, te, unet):
    clean, found = parse_prompt_loras(f"a red star, {tag} on white", adapters_dir)
    assert clean == "a red star, on white"
    assert found == [(adapters_dir / "pastel.safetensors", {"unet": unet, "text_encoder": te})]


@pytest.mark.parametrize("tag, detail", [
    ("<lora:pastel:strong>", "'strong' is not a finite number"),
    ("<lora:pastel:1:x>", "'x' is not a finite number"),
    ("<lora:pastel:1:2:3>", None),  # A1111's third number (dyn dim) is not supported
    ("<lora:pastel:>", "'' is not a finite number"),
    ("<lora:pastel:te=>", "'' is not a finite number"),
    ("<lora:pastel:unet=nan>", "'nan' is not a finite number"),
    ("<lora:pastel:te=1:unet=inf>", "'inf' is not a finite number"),
    ("<lora:pastel:clip=1>", "unknown key 'clip' (named weights are te= and unet=)"),
    ("<lora:pastel:dyn=4>", "unknown key 'dyn'"),
    ("<lora::0:1>", None),
    ("<lora:../pastel:0:1>", None),
])
def test_malformed_tags_name_the_tag_and_the_forms(adapters_dir, tag, detail):
    with pytest.raises(ValueError) as e:
        parse_prompt_loras(f"a star {tag}", adapters_dir)
    msg = str(e.value)
    assert msg.startswith(f"malformed prompt tag {tag}: ")
    for form in ("<lora:NAME>", "<lora:NAME:SCALE>", "<lora:NAME:TE:UNET>", "<lora:NAME:te=TE:unet=UNET>",
                 "text encoder first"):
        assert form in msg
    assert detail is None or detail in msg


def test_generate_with_te_unet_tag_equals_the_stack(files, capsys, tmp_path, tiny_random_pipe):  # noqa: F811
    common = ["--base", files["base"], "--steps", 2, "--seed", 3, "--adapters-dir", files["root"] / "adapters"]
    for name, tag in (("a", "<lora:pastel:0:1>"), ("b", "<lora:pastel:te=0:unet=1>"), ("c", "<lora:pastel:1:0>")):
        assert run(capsys, "generate", f"{PROMPT} {tag}", *common, "-o", tmp_path / f"{name}.png")[0] == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    stack = AdapterStack(copy.deepcopy(tiny_random_pipe))
    stack.add("pastel", files["pastel"], {"unet": 1.0, "text_encoder": 0.0})
    assert np.array_equal(np.asarray(stack.generate(PROMPT, steps=2, seed=3)), a)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # the order matters: te first
