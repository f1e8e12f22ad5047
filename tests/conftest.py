"""Shared fixtures, built once per session: imports of diffusers & co. cost seconds on 2 cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def base_pipe():
    """The embedded base, loaded once. Tests that change it must restore it."""
    from stylelora.base import load_base

    return load_base()


def _tiny_pipe(xl: bool):
    from stylelora.world.models import make_text_encoder, make_text_encoders_xl, make_unet, make_unet_xl, make_vae
    from stylelora.world.pretrain import build_pipeline
    from stylelora.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    ids = (len(tok), tok.bos_token_id, tok.eos_token_id)
    vae = make_vae()  # built in this order: the random weights are the same as they always were
    encoders = make_text_encoders_xl(*ids) if xl else make_text_encoder(*ids)
    pipe = build_pipeline(vae, encoders, tok, make_unet_xl() if xl else make_unet())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_random_pipe():
    """A random-weight pipeline of the embedded architecture, for tests that need no training."""
    return _tiny_pipe(xl=False)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_random_pipe):
    """tiny_random_pipe saved as a diffusers folder, for tests that go through --base."""
    return _saved(tmp_path_factory, tiny_random_pipe, "tiny_base")


@pytest.fixture(scope="session")
def tiny_xl_pipe():
    """A random-weight pipeline of the embedded SDXL architecture (two text encoders, text_time)."""
    return _tiny_pipe(xl=True)


@pytest.fixture(scope="session")
def tiny_xl_base(tmp_path_factory, tiny_xl_pipe):
    """tiny_xl_pipe saved as a diffusers folder, for tests that go through --base."""
    return _saved(tmp_path_factory, tiny_xl_pipe, "tiny_xl_base")


def _saved(tmp_path_factory, pipe, name: str):
    path = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`make demo`'s main job run once: (output folder, what it printed). Its dots adapter is a default
    training run of datasets/dots, which the stacking test reuses instead of training it again (~4 min)."""
    import contextlib
    import io

    from stylelora.demo import main

    out, printed = tmp_path_factory.mktemp("demo"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--out", str(out), "--no-ui"])
    return out, printed.getvalue()
