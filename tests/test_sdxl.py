"""SDXL-architecture pipelines: loading, micro-conditioning, training on both text encoders, and
blending with diffusers' own SDXL LoRA loader as the oracle. All on the tiny random XL pipeline."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from stylelora.config import TrainConfig
from stylelora.data import crop_geometry, fit_to_bucket, micro_conditioning
from stylelora.world.render import render_batch, styled_caption


@pytest.fixture(scope="module")
def xl_style_folder(tmp_path_factory):
    """Dots on 12 renders, four of them resized to 96x64 so buckets (and time ids) differ."""
    path = tmp_path_factory.mktemp("xl_dots")
    for i, (scene, img) in enumerate(render_batch(12, 7, "flat", "dots")):
        (img.resize((96, 64)) if i % 3 == 0 else img).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(styled_caption(scene, "flat", "dots"))
    return path


def _cfg(base, folder, out, **kw):
    return TrainConfig(**{**dict(dataset=str(folder), out=str(out), base=str(base), steps=4, batch_size=4, rank=2,
                                 alpha=4.0, sample_every=0, checkpoint_every=0, progress=False, log_every=2,
                                 device="cpu"), **kw})


def test_load_base_gives_an_xl_pipeline(tiny_xl_base):
    from diffusers import StableDiffusionXLPipeline

    from stylelora.base import is_xl, load_base

    pipe = load_base(tiny_xl_base)
    assert isinstance(pipe, StableDiffusionXLPipeline) and is_xl(pipe)
    assert pipe.unet.config.addition_embed_type == "text_time"


def test_half_precision_keeps_the_xl_vae_float32(tiny_xl_base):
    """SDXL's VAE overflows in float16 (NaN images); every other part is half precision."""
    from stylelora.base import load_base

    pipe = load_base(tiny_xl_base, dtype="fp16")
    assert pipe.vae.dtype == torch.float32
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float16


def test_a_pipeline_of_another_kind_is_one_clear_error(tmp_path):
    from stylelora.base import load_base

    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match=r"FluxPipeline pipeline; stylelora loads Stable Diffusion 1.x/2.x.*SDXL"):
        load_base(tmp_path)


@pytest.mark.parametrize("size, bucket, expect", [
    ((100, 60), (64, 48), [60, 100, 0, 8, 48, 64]),  # resized to 80x48: centre crop 8 px in from the left
    ((50, 120), (32, 64), [120, 50, 6, 0, 64, 32]),  # resized to 32x77: (77 - 64) // 2 = 6 rows down
    ((64, 64), (64, 64), [64, 64, 0, 0, 64, 64]),
])
def test_micro_conditioning_centre_crop(size, bucket, expect):
    """(original h, w, crop top, left, target h, w), as SDXL's add_time_ids order them."""
    assert micro_conditioning(size, bucket) == expect


@pytest.mark.parametrize("seed", range(8))
def test_micro_conditioning_names_the_crop_the_pixels_come_from(seed):
    """With random crops and flips, the reported (top, left) is where the training pixels sit in the
    resized image -- for a mirrored sample, in the mirrored resized image -- drawn from the same seed."""
    size, bucket = (90, 70), (48, 40)
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    crop = fit_to_bucket(img, bucket, random.Random(seed), random_crop=True, flip=True)
    (nw, nh), _, flipped = crop_geometry(size, bucket, random.Random(seed), True, True)
    h, w, top, left, th, tw = micro_conditioning(size, bucket, random.Random(seed), True, True)
    assert (h, w, th, tw) == (70, 90, 40, 48)
    resized = img.resize((nw, nh), Image.Resampling.LANCZOS)
    source = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else resized
    assert np.array_equal(np.asarray(crop), np.asarray(source.crop((left, top, left + 48, top + 40))))


def _run(cfg):
    from stylelora.train import _Run

    run = _Run(cfg)
    run.resume()
    run.prepare()
    return run


def test_xl_training_feeds_pooled_text_and_each_images_time_ids(tiny_xl_base, xl_style_folder, tmp_path):
    """Every UNet call of a training step gets text_encoder_2's pooled embedding and, per image, the
    add_time_ids of its own bucket and crop (4 of the 12 images are 96x64: another bucket)."""
    from stylelora.data import micro_conditioning as mc

    run = _run(_cfg(tiny_xl_base, xl_style_folder, tmp_path / "a.safetensors", caption_dropout=0.0))
    seen = []
    run.raw_unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["added_cond_kwargs"]), with_kwargs=True)
    for micro in range(3):
        batch = run._batch_indices(micro)
        run.micro_step(micro)
        want = [mc(run.data.items[run.data.item_of(i)].size, run.data.bucket_of(i)) for i in batch]
        assert seen[-1]["time_ids"].tolist() == want
        assert seen[-1]["text_embeds"].shape == (len(batch), run.pipe.text_encoder_2.config.projection_dim)
    assert any(row[:2] == [64, 96] for added in seen for row in added["time_ids"].tolist())


def test_xl_text_embeddings_of_both_encoders_are_cached_when_frozen(tiny_xl_base, xl_style_folder, tmp_path):
    run = _run(_cfg(tiny_xl_base, xl_style_folder, tmp_path / "a.safetensors", caption_dropout=0.0,
                    train_text_encoder=False))
    calls = {"text_encoder": 0, "text_encoder_2": 0}
    for name in calls:
        getattr(run.pipe, name).register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    for micro in range(3):  # the first epoch: 12 captions in 3 batches, each encoded once
        run.micro_step(micro)
    assert calls == {"text_encoder": 3, "text_encoder_2": 3}
    run.micro_step(3)  # the second epoch: every caption is cached
    assert calls == {"text_encoder": 3, "text_encoder_2": 3}


@pytest.fixture(scope="module")
def xl_adapter(tiny_xl_base, xl_style_folder, tmp_path_factory):
    """A trained XL adapter (defaults: UNet attn-ff, both text encoders) with its up factors made large
    enough that every layer visibly changes the image."""
    from stylelora.adapters import load_adapter, save_adapter
    from stylelora.train import train

    out = tmp_path_factory.mktemp("xl_adapter")
    trained = load_adapter(train(_cfg(tiny_xl_base, xl_style_folder, out / "trained.safetensors")))
    torch.manual_seed(1)
    for layer in trained.layers.values():
        layer.up = torch.randn_like(layer.up) * 0.05
    return save_adapter(trained, out / "loud.safetensors")


def test_xl_adapter_covers_both_text_encoders(xl_adapter, tiny_xl_pipe):
    from stylelora.adapters import load_adapter, resolve_module

    ad = load_adapter(xl_adapter)
    comps = {k.split(".")[0] for k in ad.layers}
    assert comps == {"unet", "text_encoder", "text_encoder_2"}
    te2 = [k for k in ad.layers if k.startswith("text_encoder_2.")]
    assert len(te2) == 4 * tiny_xl_pipe.text_encoder_2.config.num_hidden_layers  # q, k, v, out per layer
    assert all(resolve_module(tiny_xl_pipe, k) is not None for k in ad.layers)


def test_xl_stack_equals_diffusers_set_adapters(xl_adapter, tiny_xl_base):
    """Plain StableDiffusionXLPipeline.load_lora_weights + set_adapters is the oracle for merge."""
    from stylelora.base import load_base
    from stylelora.blend import AdapterStack, Scale

    kw = dict(num_inference_steps=4, height=64, width=64, output_type="np", guidance_scale=5.0)
    ours, theirs = load_base(tiny_xl_base), load_base(tiny_xl_base)
    base = ours("a red star", generator=torch.Generator().manual_seed(3), **kw).images[0]
    AdapterStack(ours).add("a", xl_adapter, Scale(0.7, 0.7, raw=True))
    mine = ours("a red star", generator=torch.Generator().manual_seed(3), **kw).images[0]
    theirs.load_lora_weights(str(xl_adapter), adapter_name="a")
    theirs.set_adapters(["a"], [0.7])
    oracle = theirs("a red star", generator=torch.Generator().manual_seed(3), **kw).images[0]
    assert np.abs(mine - base).max() > 0.02  # the adapter matters, so agreeing means something
    assert np.abs(mine - oracle).max() <= 1e-4


@pytest.mark.parametrize("mode", ["balanced", "merge", "switch", "composite"])
def test_xl_every_stacking_mode_runs_and_one_adapter_is_merge(xl_adapter, tiny_xl_base, mode):
    from stylelora.base import load_base
    from stylelora.blend import AdapterStack, Scale

    stack = AdapterStack(load_base(tiny_xl_base))
    stack.add("a", xl_adapter, Scale(0.8, 0.8, raw=True))
    one = np.asarray(stack.generate("a red star", seed=2, steps=4, mode=mode))
    assert np.array_equal(one, np.asarray(stack.generate("a red star", seed=2, steps=4, mode="merge")))
    stack.add("b", xl_adapter, Scale(0.4, 0.4, raw=True))
    two = [np.asarray(stack.generate("a red star", seed=2, steps=4, mode=mode)) for _ in range(2)]
    assert np.array_equal(*two)  # deterministic for a seed
    assert not np.array_equal(two[0], one)


def _sdxl_layout_unet():
    """SDXL's block layout at toy width: no attention in the first level, 2 layers per block,
    2 transformer blocks deeper down, linear projections, text_time."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64, 64),
        layers_per_block=2, cross_attention_dim=32, transformer_layers_per_block=(1, 2, 2), attention_head_dim=8,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)


@pytest.mark.parametrize("layout", ["embedded-xl", "sdxl"])
def test_sai_module_names_map_back_through_diffusers(tiny_xl_pipe, layout):
    """Every attention and resnet layer's SAI name (what kohya SDXL keys are built from), read back by
    diffusers' own SDXL kohya loader (its sgm block mapping), names the module it came from."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    from stylelora.adapters import _to_peft
    from stylelora.base import ldm_unet_module

    unet = tiny_xl_pipe.unet if layout == "embedded-xl" else _sdxl_layout_unet()
    layers = unet.config.layers_per_block
    modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
               and (".attentions." in n or ".resnets." in n)]
    assert len(modules) > 50
    for module in modules:
        name = "lora_unet_" + ldm_unet_module(module, layers).replace(".", "_")
        sd = {f"{name}.lora_down.weight": torch.zeros(1, 4), f"{name}.lora_up.weight": torch.zeros(4, 1)}
        converted, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(sd, unet_config=unet.config)
        back = {_to_peft("unet", k.removeprefix("unet.")).rsplit(".lora_", 1)[0] for k in converted}
        assert back == {module}, (module, name, converted.keys())


def test_xl_single_file_round_trip(tiny_xl_pipe, tiny_xl_base, tmp_path):
    """save_single_file writes SDXL's original layout (conditioner.embedders.0 = CLIP-L, .1 = OpenCLIP
    bigG with fused q/k/v); diffusers' from_single_file, through load_base, reads every tensor back."""
    from diffusers import StableDiffusionXLPipeline

    from stylelora.base import load_base, save_single_file

    path = save_single_file(tiny_xl_pipe, tmp_path / "xl.safetensors")
    pipe = load_base(path, config=tiny_xl_base)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(tiny_xl_pipe, comp).state_dict(), getattr(pipe, comp).state_dict()
        assert set(want) == set(got), comp
        assert all(torch.equal(want[k], got[k]) for k in want), comp


def test_merging_xl_adapters_keeps_their_block_count(xl_adapter, tiny_xl_pipe, tmp_path):
    """A merge of embedded-XL adapters is still written with the embedded XL UNet's SAI block numbers
    (1 layer per block, recorded in the file), so diffusers and stylelora read it onto the same modules."""
    from stylelora.adapters import XL_LAYERS_KEY, load_adapter, save_adapter
    from stylelora.blend import merge_adapters

    merged, _ = merge_adapters([(load_adapter(xl_adapter), 0.5), (load_adapter(xl_adapter), 0.25)])
    assert merged.metadata[XL_LAYERS_KEY] == "1"
    back = load_adapter(save_adapter(merged, tmp_path / "m.safetensors"))
    assert set(back.layers) == set(load_adapter(xl_adapter).layers)
