"""Masked loss: where masks come from (mask folder, alpha channel), that they follow their image
through bucket crops and flips, the errors for bad masks, and that a masked-out region teaches
exactly nothing (bit-identical loss and LoRA gradients) while masks off change nothing."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from stylelora.cli import build_parser, main
from stylelora.config import load_toml
from stylelora.data import CaptionFolder, discover
from stylelora.train import TrainConfig, train
from stylelora.world.render import render_batch, styled_caption


def gray(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), "L").save(path)


def rgb(path, size=(16, 16), color=(200, 30, 30), caption="a thing") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    path.with_suffix(".txt").write_text(caption)


# ----------------------------------------------------------------------------- config

def test_flags_toml_key_and_config_rules(tmp_path):
    args = build_parser().parse_args(["train", "ds", "--masked-loss", "--mask-dir", "elsewhere"])
    assert args.masked_loss is True and args.mask_dir == "elsewhere"
    assert not hasattr(build_parser().parse_args(["train", "ds"]), "masked_loss")  # unset: the default
    (tmp_path / "t.toml").write_text("masked_loss = true\nmask_dir = 'm'\n")
    assert load_toml(tmp_path / "t.toml") == {"masked_loss": True, "mask_dir": "m"}
    assert TrainConfig(dataset="x").masked_loss is False
    with pytest.raises(ValueError, match=r"mask_dir \(m\) is set but masked_loss is off: add --masked-loss"):
        TrainConfig(dataset="x", mask_dir="m")
    summary = TrainConfig(dataset="x", masked_loss=True, mask_dir="/home/me/masks").summary()
    assert summary["masked_loss"] is True and "mask_dir" not in summary  # no local paths in metadata


# ----------------------------------------------------------------------------- sources

def test_mask_folder_and_alpha_channel_sources(tmp_path):
    ds = tmp_path / "ds"
    rgb(ds / "a.png")
    gray(ds / "masks" / "a.png", np.tile(np.arange(16) * 17, (16, 1)))  # gray ramp 0..255 left to right
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3], rgba[:8, :, 3] = 90, 255  # top half opaque
    (ds / "sub").mkdir()
    Image.fromarray(rgba, "RGBA").save(ds / "sub" / "b.png")
    (ds / "sub" / "b.txt").write_text("b")
    rgb(ds / "c.jpg")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(ds / "masks" / "c.png")  # colour file: its luminance
    both = Image.new("RGBA", (16, 16), (10, 10, 10, 0))  # alpha all 0, but its mask file wins
    both.save(ds / "d.png")
    (ds / "d.txt").write_text("d")
    gray(ds / "masks" / "d.png", np.full((16, 16), 128))

    data = CaptionFolder(ds, resolution=16, masks=True)
    assert [it.rel for it in data.items] == ["a.png", "c.jpg", "d.png", "sub/b.png"]  # masks/ is not data
    assert "masked loss: 3 mask files (in " in data.report and ", 1 alpha channel" in data.report
    masks = {data.items[s["item"]].rel: s["mask"] for s in (data[i] for i in range(len(data)))}
    assert masks["a.png"].shape == (1, 16, 16) and masks["a.png"].dtype == torch.float32
    assert torch.equal(masks["a.png"][0, 5], torch.arange(16) * 17 / 255.0)
    assert torch.equal(masks["sub/b.png"][0], torch.cat([torch.ones(8, 16), torch.zeros(8, 16)]))
    assert torch.equal(masks["c.jpg"], torch.full((1, 16, 16), 76 / 255.0))  # PIL's L of pure red
    assert torch.equal(masks["d.png"], torch.full((1, 16, 16), 128 / 255.0))

    # A folder elsewhere, by --mask-dir: same layout, any image type.
    other = tmp_path / "other"
    for rel in ("a", "c", "d", "sub/b"):
        gray(other / f"{rel}.webp", np.full((16, 16), 255))
    data = CaptionFolder(ds, resolution=16, masks=True, mask_dir=other)
    assert all(torch.equal(data[i]["mask"], torch.ones(1, 16, 16)) for i in range(len(data)))
    assert "masked loss: 4 mask files" in data.report
    # Masks off: no "mask" in samples, and a folder of masks that mirror the images is still not data.
    off = CaptionFolder(ds, resolution=16)
    assert "mask" not in off[0] and len(off.items) == 4
    assert "a mask folder (each image in it has a same-stem image" in off.report


def test_mask_follows_its_image_through_random_crops_and_flips(tmp_path):
    """The mask is the image's red channel, a left-to-right ramp with an off-centre block: after any
    crop and flip, mask and red channel must still agree pixel for pixel."""
    red = np.tile(np.linspace(0, 255, 96).round(), (64, 1))
    red[10:30, 5:25] = 255  # asymmetric: a bright block near the left edge
    img = np.zeros((64, 96, 3), np.uint8)
    img[..., 0] = red
    (tmp_path / "ds").mkdir()
    Image.fromarray(img, "RGB").save(tmp_path / "ds" / "w.png")
    (tmp_path / "ds" / "8_rep").mkdir()  # eight more samples of a copy, for more draws
    shutil.copy(tmp_path / "ds" / "w.png", tmp_path / "ds" / "8_rep" / "w.png")
    gray(tmp_path / "ds" / "masks" / "w.png", red)
    gray(tmp_path / "ds" / "masks" / "8_rep" / "w.png", red)
    # 96x64 into a 64x64 bucket: no resize, a crop of 64 of 96 columns: exact
    data = CaptionFolder(tmp_path / "ds", resolution=64, bucket=False, random_crop=True, flip=True, masks=True)
    seen = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in range(len(data)):
            s = data[i]
            red_now = (s["pixel_values"][0] + 1) * 127.5
            assert torch.allclose(s["mask"][0] * 255, red_now, atol=1e-3), f"epoch {epoch} sample {i}"
            seen.add((bool(red_now[40, 0] > red_now[40, -1]), int(red_now[40].min())))  # (flip, crop)
    assert {flipped for flipped, _ in seen} == {True, False} and len(seen) > 4  # both flips, many crops

    # 192x128 halves to 96x64 before the crop: the mask is resampled by area, the image by Lanczos.
    big = tmp_path / "big"
    (big / "masks").mkdir(parents=True)
    double = Image.Resampling.NEAREST
    Image.fromarray(img, "RGB").resize((192, 128), double).save(big / "w.png")
    Image.fromarray(red.astype(np.uint8), "L").resize((192, 128), double).save(big / "masks" / "w.png")
    data = CaptionFolder(big, resolution=64, bucket=False, random_crop=True, flip=True, masks=True)
    for epoch in range(8):
        data.set_epoch(epoch)
        s = data[0]
        red_now = ((s["pixel_values"][0] + 1) / 2)
        aligned = (s["mask"][0] - red_now).abs().mean()
        mirrored = (s["mask"][0].flip(-1) - red_now).abs().mean()
        assert aligned < 0.01 < mirrored, (epoch, aligned, mirrored)


# ----------------------------------------------------------------------------- bad input

def test_an_image_without_mask_or_alpha_is_one_error_naming_it_and_the_fix(tmp_path):
    rgb(tmp_path / "a.png")
    rgb(tmp_path / "sub" / "b.png")
    gray(tmp_path / "masks" / "a.png", np.full((16, 16), 255))
    with pytest.raises(ValueError) as e:
        CaptionFolder(tmp_path, resolution=16, masks=True)
    msg = str(e.value)
    assert msg.startswith("masked loss is on, but 1 image has no mask (sub/b.png): add a grayscale mask "
                          "(white = learn, black = ignore)")
    assert str(tmp_path / "masks" / "sub" / "b.png") in msg and "save the image with transparency" in msg
    assert "turn masked_loss (--masked-loss) off" in msg
    nowhere = tmp_path / "none"
    with pytest.raises(FileNotFoundError, match=f"mask folder {nowhere} does not exist"):
        CaptionFolder(tmp_path, resolution=16, masks=True, mask_dir=nowhere)
    with pytest.raises(ValueError, match="is the dataset folder itself"):
        CaptionFolder(tmp_path, resolution=16, masks=True, mask_dir=tmp_path)


def test_a_mask_of_another_size_names_both_files(tmp_path):
    rgb(tmp_path / "a.png", size=(16, 12))
    gray(tmp_path / "masks" / "a.png", np.full((16, 16), 255))
    with pytest.raises(ValueError) as e:
        CaptionFolder(tmp_path, resolution=16, masks=True)
    assert str(e.value) == (f"mask {tmp_path / 'masks' / 'a.png'} is 16x16 but its image {tmp_path / 'a.png'} is "
                            "16x12: a mask must have its image's size; resize it to match")


def test_bad_mask_files_are_named(tmp_path):
    rgb(tmp_path / "a.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=f"cannot read mask {tmp_path / 'masks' / 'a.png'} .*save it again"):
        CaptionFolder(tmp_path, resolution=16, masks=True)
    (tmp_path / "masks" / "a.png").unlink()
    gray(tmp_path / "masks" / "a.png", np.full((16, 16), 255))
    gray(tmp_path / "masks" / "a.jpg", np.full((16, 16), 255))
    with pytest.raises(ValueError, match=r"several masks for .*a.png: .*masks/a.jpg, .*masks/a.png; keep one"):
        CaptionFolder(tmp_path, resolution=16, masks=True)


def test_all_black_masks_and_masks_without_an_image_are_named_in_the_report(tmp_path):
    rgb(tmp_path / "a.png")
    rgb(tmp_path / "b.png")
    gray(tmp_path / "masks" / "a.png", np.zeros((16, 16)))
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    clear.save(tmp_path / "c.png")
    gray(tmp_path / "masks" / "b.png", np.full((16, 16), 255))
    gray(tmp_path / "masks" / "typo.png", np.full((16, 16), 255))
    report = CaptionFolder(tmp_path, resolution=16, masks=True).report
    assert (f"warning: 2 masks are all black, so their images teach nothing ({tmp_path / 'masks' / 'a.png'}, "
            f"{tmp_path / 'c.png'} (alpha channel)); paint what to learn white, or remove the image") in report
    assert (f"warning: 1 mask in {tmp_path / 'masks'} matches no image ({tmp_path / 'masks' / 'typo.png'}); "
            "give each mask its image's relative path and stem") in report


def test_discovery_keeps_a_masks_folder_of_real_images_when_masks_are_off(tmp_path):
    rgb(tmp_path / "a.png")
    rgb(tmp_path / "masks" / "venetian.png")  # a photo of a mask, not a mask: trained as before
    items, skipped = discover(tmp_path)
    assert [it.rel for it in items] == ["a.png", "masks/venetian.png"] and skipped == []


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def masked_folders(tmp_path_factory):
    """The same 12 outline images three ways: a mask folder whose masks black out the left half;
    RGBA images whose alpha does the same; and all-white masks."""
    root = tmp_path_factory.mktemp("masked")
    left_off = np.full((64, 64), 255, np.uint8)
    left_off[:, :32] = 0
    for i, (scene, img) in enumerate(render_batch(12, 5, "flat", "outline")):
        caption = styled_caption(scene, "flat", "outline")
        for name in ("folder", "alpha", "white"):
            (root / name).mkdir(exist_ok=True)
            (root / name / f"{i:03d}.txt").write_text(caption)
        img.save(root / "folder" / f"{i:03d}.png")
        gray(root / "folder" / "masks" / f"{i:03d}.png", left_off)
        img.putalpha(Image.fromarray(left_off, "L"))
        img.save(root / "alpha" / f"{i:03d}.png")
        img.convert("RGB").save(root / "white" / f"{i:03d}.png")
        gray(root / "white" / "masks" / f"{i:03d}.png", np.full((64, 64), 255))
    return root


def _cfg(tiny_base, dataset, out, **kw):
    base = dict(dataset=str(dataset), out=str(out), base=str(tiny_base), steps=3, batch_size=4, rank=2, alpha=4.0,
                sample_every=0, checkpoint_every=0, progress=False, log_every=1, device="cpu",
                calibrate_strength=False, masked_loss=True)
    return TrainConfig(**(base | kw))


def _spied_run(monkeypatch, cfg, perturb: str | None):
    """Train cfg; return each micro-batch's loss, each step's LoRA gradients and the latent masks
    trained with. `perturb` adds 3 to the prediction target where the batch's latent mask is 0
    ("masked") or 1 ("learned")."""
    import stylelora.train as T

    losses, grads, masks, seen = [], [], {}, []
    real_batch, real_noised, real_step = T._Run._batch, T._Run._noised, T._Run.micro_step
    real_make = T._make_optimizer

    def batch(self, micro):
        out = masks["now"] = real_batch(self, micro)
        seen.append(out[3])
        return out

    def noised(self, latents, gen):
        noisy, t, target = real_noised(self, latents, gen)
        m = masks["now"][3]
        if perturb is not None:
            where = (m == 0) if perturb == "masked" else (m == 1)
            assert where.any(), "the perturbed region must not be empty"
            target = target + 3.0 * where.expand_as(target)
        return noisy, t, target

    def make(cfg, groups):
        opt = real_make(cfg, groups)
        params = [p for g in groups for p in g["params"]]
        step = opt.step

        def recording_step(*a, **k):
            grads.append([p.grad.clone() for p in params])
            return step(*a, **k)

        opt.step = recording_step
        return opt

    monkeypatch.setattr(T._Run, "_batch", batch)
    monkeypatch.setattr(T._Run, "_noised", noised)
    monkeypatch.setattr(T._Run, "micro_step", lambda self, micro: losses.append(real_step(self, micro)) or losses[-1])
    monkeypatch.setattr(T, "_make_optimizer", make)
    train(cfg)
    monkeypatch.undo()
    return losses, grads, torch.cat(seen)


@pytest.mark.parametrize("source, kw", [
    ("folder", {}),
    ("alpha", {}),
    ("folder", {"flip": True, "random_crop": True}),  # no latent cache: masks made per step, flipped
    ("folder", {"preserve_weight": 1.0, "v_pred": True}),  # prior preservation on a v-prediction base
])
def test_a_masked_out_region_gets_exactly_zero_gradient(tiny_base, masked_folders, tmp_path, monkeypatch,
                                                         source, kw):
    kw = dict(kw)
    base = tiny_base
    if kw.pop("v_pred", False):
        import json

        base = tmp_path / "vbase"
        shutil.copytree(tiny_base, base)
        conf = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
        conf.update(prediction_type="v_prediction")
        (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(conf))
    runs = {}
    for perturb in (None, "masked", "learned"):
        cfg = _cfg(tiny_base, masked_folders / source, tmp_path / f"{perturb}.safetensors", base=str(base), **kw)
        runs[perturb] = _spied_run(monkeypatch, cfg, perturb)
    (loss, grads, masks), (loss_m, grads_m, _), (loss_l, grads_l, _) = runs[None], runs["masked"], runs["learned"]
    left_off = torch.tensor([0.0] * 4 + [1.0] * 4)  # latent columns of the half-black masks
    rows = {tuple(m[0, 0].tolist()) for m in masks}
    assert rows == ({tuple(left_off.tolist()), tuple(left_off.flip(0).tolist())} if kw.get("flip")
                    else {tuple(left_off.tolist())})  # flipped images bring flipped masks
    assert len(grads) == 3 and loss == loss_m  # bit for bit: floats compared with ==
    for step, (g, g_m) in enumerate(zip(grads, grads_m)):
        assert all(torch.equal(a, b) for a, b in zip(g, g_m)), f"step {step}: a masked-out target moved a gradient"
    # The control: the same change where the mask is white changes the loss and the gradients.
    assert loss_l[0] != loss[0]
    assert not all(torch.equal(a, b) for a, b in zip(grads[0], grads_l[0]))


def test_white_masks_train_exactly_as_masked_loss_off(tiny_base, masked_folders, tmp_path):
    from safetensors.torch import load_file

    off = train(_cfg(tiny_base, masked_folders / "white", tmp_path / "off.safetensors", masked_loss=False))
    on = train(_cfg(tiny_base, masked_folders / "white", tmp_path / "on.safetensors"))
    a, b = load_file(str(off)), load_file(str(on))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    half = train(_cfg(tiny_base, masked_folders / "folder", tmp_path / "half.safetensors"))
    c = load_file(str(half))
    assert not all(torch.equal(a[k], c[k]) for k in a), "a half-black mask must change the adapter"


def test_the_loss_weights_each_pixel_by_its_mask_over_the_element_count():
    from stylelora.train import _latent_mask, _per_sample_mse

    pred, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    masks = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    # two masked samples (half white: half the plain loss) and one preservation sample (full weight)
    assert _per_sample_mse(pred, target, masks).tolist() == [0.5, 0.5, 1.0]
    assert torch.equal(_per_sample_mse(pred, target, None), torch.ones(3))
    # Pixel masks reach the latent grid as block means: 8x8 pixels per latent pixel.
    pixels = torch.zeros(1, 16, 16)
    pixels[:, :8, :4] = 1.0
    assert _latent_mask(pixels, (2, 2)).tolist() == [[[0.5, 0.0], [0.0, 0.0]]]


def test_the_cli_says_which_image_lacks_a_mask_in_one_line(tiny_base, tmp_path, capsys):
    rgb(tmp_path / "ds" / "a.png", size=(64, 64))
    code = main(["train", str(tmp_path / "ds"), "--out", str(tmp_path / "a.safetensors"), "--base", str(tiny_base),
                 "--masked-loss", "--steps", "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "1 image has no mask (a.png)" in err
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "a.run").exists()
