"""Training: config validation, a real short run on a tiny base, plain-diffusers loading, exact
resume, and multi-process training under `accelerate launch`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stylelora.adapters import load_adapter
from stylelora.cli import main
from stylelora.data import RUN_MARKER
from stylelora.train import TrainConfig, load_toml, train
from stylelora.world.render import render_batch, styled_caption

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"lr": 0.0}, "learning rate must be positive, got 0.0"),
    ({"resolution": 60}, "resolution must be a positive multiple of 8, got 60: try 64"),
    ({"optimizer": "sgd"}, "optimizer 'sgd' unknown"),
    ({"targets": "everything"}, "targets 'everything' unknown"),
    ({"out": "adapter.pt"}, "out must end in .safetensors"),
    ({"caption_dropout": 1.5}, "caption_dropout must be in"),
    ({"min_snr_gamma": -1.0}, r"min_snr_gamma must be >= 0 \(0 = off"),
    ({"lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"noise_offset": float("nan")}, "noise_offset must be a finite number, got nan"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(dataset="x", **kwargs)


def test_min_snr_gamma_zero_turns_the_weighting_off_from_the_cli(tmp_path, tiny_base, style_folder, monkeypatch):
    import stylelora.train as T
    from stylelora.cli import build_parser

    args = build_parser().parse_args(["train", str(tmp_path), "--min-snr-gamma", "0"])
    assert args.min_snr_gamma == 0.0
    calls = []
    real = T._snr_weights
    monkeypatch.setattr(T, "_snr_weights", lambda *a: calls.append(a) or real(*a))
    train(_cfg(tiny_base, style_folder, tmp_path / "off.safetensors", steps=2, min_snr_gamma=args.min_snr_gamma))
    assert calls == []
    train(_cfg(tiny_base, style_folder, tmp_path / "on.safetensors", steps=2))  # the default, 5
    assert len(calls) == 2 * TrainConfig().grad_accum and calls[0][2] == 5.0  # once per micro-batch


def test_toml_unknown_keys_are_named(tmp_path):
    (tmp_path / "t.toml").write_text('rank = 8\nlearning_rate = 1e-3\nstpes = 5\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate', 'stpes'\]"):
        load_toml(tmp_path / "t.toml")
    (tmp_path / "ok.toml").write_text('[train]\nrank = 8\nlr = 2e-3\n')
    assert load_toml(tmp_path / "ok.toml") == {"rank": 8, "lr": 2e-3}


def test_every_train_flag_has_help_with_its_default():
    import dataclasses

    from stylelora.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    by_dest = {a.dest: a for a in train_parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "dataset":  # the positional argument
            continue
        action = by_dest[f.name]
        assert len(action.help) > 15, f"--{f.name} has no help text"
        if f.default is not None and f.default is not dataclasses.MISSING:
            assert action.help.endswith(f"(default: {f.default})"), action.help
    assert "attn-ff (default" in by_dest["targets"].help and "| attn | cross-attn" in by_dest["targets"].help
    assert by_dest["mixed_precision"].help.startswith("no | fp16 | bf16")


def test_cli_flags_override_toml_and_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "t.toml").write_text("rank = 0\n")
    assert main(["train", str(tmp_path), "--config", str(tmp_path / "t.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank must be a positive integer" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def style_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("outline")
    for i, (scene, img) in enumerate(render_batch(12, 5, "flat", "outline")):
        img.save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(styled_caption(scene, "flat", "outline"))
    return path


def _cfg(tiny_base, style_folder, out, **kw):
    base = dict(dataset=str(style_folder), out=str(out), base=str(tiny_base), steps=12, batch_size=4,
                rank=2, alpha=4.0, sample_every=0, checkpoint_every=0, progress=False, log_every=2,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_writes_a_working_adapter(tiny_base, style_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stylelora.adapters import load_adapter

    out = train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", sample_every=6))
    adapter = load_adapter(out)
    assert adapter.rank == 2 and adapter.alpha == 4.0
    assert adapter.components == {"unet", "text_encoder"}
    meta = adapter.metadata
    assert json.loads(meta["stylelora.training"])["steps"] == 12
    assert json.loads(meta["stylelora.dataset"])["n_images"] == 12
    assert json.loads(meta["stylelora.trigger_words"]) == ["outline"]
    assert any(layer.up.abs().sum() > 0 for layer in adapter.layers.values()), "training moved nothing"
    run = tmp_path / "a.run"
    rows = (run / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and [int(r.split(",")[0]) for r in rows[1:]] == [2, 4, 6, 8, 10, 12]
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000006.png", "step-000012.png"]
    assert (run / RUN_MARKER).is_file()  # discovery skips the run folder whatever it is renamed to

    # Plain diffusers loads every trained layer with the same weights and scale.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.load_lora_weights(str(out), adapter_name="style")
    loaded = {}
    for comp in ("unet", "text_encoder"):
        for name, module in getattr(pipe, comp).named_modules():
            if hasattr(module, "lora_A") and "style" in module.lora_A:
                loaded[f"{comp}.{name}"] = module
    assert set(loaded) == set(adapter.layers)
    for key, module in loaded.items():
        assert torch.equal(module.lora_A["style"].weight, adapter.layers[key].down)
        assert torch.equal(module.lora_B["style"].weight, adapter.layers[key].up)
        assert module.scaling["style"] == pytest.approx(2.0)


class Killed(Exception):
    pass


def test_resume_continues_exactly(tiny_base, style_folder, tmp_path, monkeypatch):
    import stylelora.train as T

    full = train(_cfg(tiny_base, style_folder, tmp_path / "full.safetensors", lora_dropout=0.1))
    # The same run, killed right after writing its step-6 checkpoint, then resumed from it.
    real_save = T.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(_cfg(tiny_base, style_folder, tmp_path / "part.safetensors", lora_dropout=0.1, checkpoint_every=6))
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    ckpt = tmp_path / "part.run" / "checkpoints" / "step-000006"
    assert (ckpt / "state.json").is_file() and not list(ckpt.parent.glob("*.tmp"))
    assert not (tmp_path / "part.safetensors").exists(), "no adapter may appear before training ends"
    resumed = train(_cfg(tiny_base, style_folder, tmp_path / "part.safetensors", lora_dropout=0.1,
                         resume=str(tmp_path / "part.run")))
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_gradient_accumulation_steps_the_optimizer_once_per_grad_accum_batches(tiny_base, style_folder, tmp_path,
                                                                                 monkeypatch):
    """The default accumulates 3 micro-batches per step: the optimizer steps once per step, on the
    gradients summed over them (zeroed after a step only), not once per micro-batch."""
    from safetensors.torch import load_file

    optimizers, events = [], []
    real_init, real_step, real_backward = torch.optim.AdamW.__init__, torch.optim.AdamW.step, torch.Tensor.backward

    def first_grad():  # the first LoRA up-projection (out x rank 2): every micro-batch gives it a gradient
        p = next(p for g in optimizers[0].param_groups for p in g["params"] if p.shape[-1] == 2 < p.shape[0])
        return None if p.grad is None else p.grad.clone()

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        optimizers.append(self)

    def step(self, *args, **kwargs):
        events.append(("step", first_grad()))
        return real_step(self, *args, **kwargs)

    def backward(self, *args, **kwargs):
        before = first_grad()
        real_backward(self, *args, **kwargs)
        events.append(("backward", before, first_grad()))

    monkeypatch.setattr(torch.optim.AdamW, "__init__", init)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=2, grad_accum=3, checkpoint_every=1,
               keep_checkpoints=2, caption_dropout=0.0))
    assert [e[0] for e in events] == ["backward"] * 3 + ["step"] + ["backward"] * 3 + ["step"]
    for first in (0, 4):  # each step's first micro-batch starts from zero, the next two add to it
        assert events[first][1] is None
        for k in (1, 2):
            before, after = events[first + k][1], events[first + k][2]
            assert torch.equal(before, events[first + k - 1][2]) and not torch.equal(after, before)
    state = load_file(str(tmp_path / "a.run" / "checkpoints" / "step-000001" / "optimizer.safetensors"))
    assert {float(v) for k, v in state.items() if k.endswith("::step")} == {1.0}


@pytest.mark.slow
def test_accelerate_launch_two_processes(tiny_base, style_folder, tmp_path):
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "stylelora.cli", "train", str(style_folder), "--out", str(out), "--base", str(tiny_base),
           "--steps", "6", "--batch-size", "2", "--rank", "2", "--sample-every", "0",
           "--checkpoint-every", "0", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    from stylelora.adapters import load_adapter

    adapter = load_adapter(out)
    assert adapter.rank == 2 and any(layer.up.abs().sum() > 0 for layer in adapter.layers.values())


def test_preservation_keeps_untriggered_prompts_at_the_base(tiny_base, style_folder, tmp_path):
    """preserve_weight trains each caption without its trigger towards the frozen base: the
    adapter then moves untriggered predictions about half as far as one trained without it, with
    the same steps (at 60 steps the triggered ones have not separated yet; that shows in images,
    through guidance: bench/styles.py). On the embedded base, whose text encoder knows captions."""
    from stylelora.base import load_base
    from stylelora.blend import AdapterStack

    pipe = load_base()
    caption = "a red star on a white background"
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([100, 300, 600, 900])

    @torch.no_grad()
    def prediction(prompt):
        ids = pipe.tokenizer([prompt] * 4, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        return pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample

    base = {p: prediction(p) for p in (caption, f"{caption}, outline")}
    drift = {}
    for weight in (0.0, 1.0):
        out = train(_cfg(tiny_base, style_folder, tmp_path / f"p{weight}.safetensors", steps=60, grad_accum=1,
                         lr=1e-2, preserve_weight=weight, base=None))
        stack = AdapterStack(pipe)
        stack.add("style", out)
        drift[weight] = {p: ((prediction(p) - b).norm() / b.norm()).item() for p, b in base.items()}
        stack.reset()
    assert drift[1.0][caption] < 0.6 * drift[0.0][caption], drift
    assert drift[0.0][caption] > 0.05, "the unpreserved adapter must move the base for this to test anything"


def test_bf16_keeps_frozen_weights_in_bf16_and_trains_float32_lora(tiny_base, style_folder, tmp_path, monkeypatch):
    """mixed_precision as the diffusers examples use it: base in half precision, LoRA float32 (what
    the optimizer and fp16's gradient scaler need). Runs on CPU autocast here, CUDA the same way."""
    import stylelora.train as T

    seen = {}
    real = T._make_optimizer

    def spy(cfg, groups):
        seen["lora"] = {p.dtype for g in groups for p in g["params"]}
        return real(cfg, groups)

    monkeypatch.setattr(T, "_make_optimizer", spy)
    import stylelora.base

    real_load = stylelora.base.load_base
    pipes = []
    monkeypatch.setattr(stylelora.base, "load_base", lambda *a, **k: pipes.append(real_load(*a, **k)) or pipes[-1])
    out = train(_cfg(tiny_base, style_folder, tmp_path / "bf16.safetensors", steps=3, mixed_precision="bf16"))
    assert seen["lora"] == {torch.float32}
    frozen = {p.dtype for m in (pipes[0].unet, pipes[0].text_encoder, pipes[0].vae)
              for n, p in m.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16}, "the frozen base must be held in bf16 (half the memory)"
    adapter = load_adapter(out)
    assert all(l.up.dtype == torch.float32 and torch.isfinite(l.up).all() for l in adapter.layers.values())
    assert any(l.up.abs().max() > 0 for l in adapter.layers.values()), "bf16 training did not move LoRA B"
    from stylelora.adapters import fingerprint

    # the fingerprint is the bf16 copy's, the weights trained against
    assert adapter.metadata["stylelora.base_fingerprint"] == fingerprint(real_load(tiny_base, dtype="bf16"))


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tiny_base, style_folder, tmp_path):
    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=4, checkpoint_every=2))
    with pytest.raises(ValueError, match=r"different settings: rank=2 there, 4 here, lr=0.002 there, 0.005 here"):
        train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=6, rank=4, lr=5e-3,
                   resume=str(tmp_path / "a.run")))
    # a longer run is allowed: steps may change
    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=6, resume=str(tmp_path / "a.run")))


def test_a_new_run_into_an_old_run_folder_clears_its_checkpoints(tiny_base, style_folder, tmp_path, capsys):
    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=4, checkpoint_every=2))
    assert [p.name for p in sorted((tmp_path / "a.run" / "checkpoints").iterdir())] == ["step-000002"]
    capsys.readouterr()
    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=2, rank=4))
    assert "removed 1 checkpoint(s) of an earlier run" in capsys.readouterr().out
    assert list((tmp_path / "a.run" / "checkpoints").iterdir()) == []  # --resume can no longer find the old run


def test_resume_from_another_folder_or_an_earlier_step_drops_the_checkpoints_it_abandons(
        tiny_base, style_folder, tmp_path, capsys):
    a_ckpts = tmp_path / "a.run" / "checkpoints"
    samples = tmp_path / "a.run" / "samples"
    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=8, checkpoint_every=2, keep_checkpoints=3,
               sample_every=4))
    assert [p.name for p in sorted(a_ckpts.iterdir())] == ["step-000002", "step-000004", "step-000006"]
    assert sorted(p.name for p in samples.iterdir()) == ["step-000004.png", "step-000008.png"]
    # Back to step 2 of the same run, with a different length: 4 and 6 belong to the abandoned branch,
    # and so do its sample grids after step 2.
    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=5, checkpoint_every=2,
               keep_checkpoints=3, sample_every=4, resume=str(a_ckpts / "step-000002")))
    assert "removed 2 checkpoint(s) this run does not continue from" in capsys.readouterr().out
    assert [p.name for p in sorted(a_ckpts.iterdir())] == ["step-000002", "step-000004"]
    assert sorted(p.name for p in samples.iterdir()) == ["step-000004.png", "step-000005.png"]
    # From another run's checkpoint into this folder: none of this folder's states may survive.
    train(_cfg(tiny_base, style_folder, tmp_path / "b.safetensors", steps=2, checkpoint_every=1))
    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=3,
               resume=str(tmp_path / "b.run" / "checkpoints" / "step-000001")))
    assert list(a_ckpts.iterdir()) == []


def test_resume_refuses_other_data_or_process_count_and_restores_plain_number_optimizer_state(
        tiny_base, style_folder, tmp_path):
    import shutil

    import stylelora.train as T

    train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=4, checkpoint_every=2))
    ckpt = tmp_path / "a.run" / "checkpoints" / "step-000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["identity"]["processes"] == 1 and len(state["identity"]["dataset_fingerprint"]) == 16
    edited = tmp_path / "edited"
    shutil.copytree(style_folder, edited)
    (edited / "000.txt").write_text("a different caption")
    with pytest.raises(ValueError, match=r"dataset_fingerprint .* the images or captions changed"):
        train(_cfg(tiny_base, edited, tmp_path / "a.safetensors", steps=4, resume=str(ckpt)))
    state["identity"]["processes"] = 2
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"has processes 2, this run 1: resume with the same number of processes"):
        train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=4, resume=str(ckpt)))

    # bitsandbytes keeps its step count as a plain int: it must come back, next to the tensors.
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["step_int"] = 7
    cfg = _cfg(tiny_base, style_folder, tmp_path / "c.safetensors")
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    saved = T.save_checkpoint(tmp_path / "c.run", 5, {"w": p}, opt, cfg, scaler=scaler)
    q = torch.nn.Parameter(torch.zeros(3))
    opt2 = torch.optim.AdamW([q])
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    assert T.load_checkpoint(saved, {"w": q}, opt2, cfg, scaler=scaler2) == 5
    assert opt2.state[q]["step_int"] == 7 and torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    assert scaler2.get_scale() == 512.0


def test_min_snr_weights_are_the_formula_and_finite_at_zero_terminal_snr():
    from diffusers import DDPMScheduler

    import stylelora.train as T

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          rescale_betas_zero_snr=True)
    t = torch.tensor([0, 300, 700, 999])
    a = sched.alphas_cumprod[t].double()
    snr = (a / (1 - a)).tolist()
    assert snr[0] > 5 > snr[2] and snr[-1] == 0.0
    eps = T._snr_weights(sched.alphas_cumprod, t, 5.0, False).tolist()
    v = T._snr_weights(sched.alphas_cumprod, t, 5.0, True).tolist()
    assert eps == pytest.approx([5 / snr[0], 5 / snr[1] if snr[1] > 5 else 1.0, 1.0, 1.0], rel=1e-5)
    assert v == pytest.approx([min(x, 5) / (x + 1) for x in snr], rel=1e-5) and v[-1] == 0.0


def test_v_prediction_base_trains_against_the_velocity(tiny_base, style_folder, tmp_path, monkeypatch):
    """The target comes from the base's scheduler: an SD2-style base (v-prediction, zero-terminal
    SNR) trains against get_velocity, to a finite adapter that differs from the epsilon one."""
    import shutil

    from diffusers import DDPMScheduler

    vbase = tmp_path / "vbase"
    shutil.copytree(tiny_base, vbase)
    conf = json.loads((vbase / "scheduler" / "scheduler_config.json").read_text())
    conf.update(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    (vbase / "scheduler" / "scheduler_config.json").write_text(json.dumps(conf))
    calls = []
    real = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *a: calls.append(1) or real(self, *a))
    v_out = train(_cfg(tiny_base, style_folder, tmp_path / "v.safetensors", steps=4, base=str(vbase)))
    assert len(calls) == 4 * TrainConfig().grad_accum  # once per micro-batch
    eps_out = train(_cfg(tiny_base, style_folder, tmp_path / "e.safetensors", steps=4))
    assert len(calls) == 4 * TrainConfig().grad_accum  # the epsilon base never asks for the velocity
    v, e = _weights(v_out), _weights(eps_out)
    assert all(torch.isfinite(x).all() for x in v.values())
    assert max((v[k] - e[k]).abs().max().item() for k in v) > 1e-4


def test_a_diverging_run_stops_at_the_first_bad_loss_and_names_the_fix(tiny_base, style_folder, tmp_path):
    with pytest.raises(ValueError, match=r"the loss is (nan|inf) at step \d+: training diverged. Lower the "
                                         r"learning rate \(--lr 1e\+30 now"):
        train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=12, lr=1e30, max_grad_norm=0.0,
                   log_every=1))
    assert not (tmp_path / "a.safetensors").exists()


def test_the_adapter_is_written_even_when_the_loss_plot_fails(tiny_base, style_folder, tmp_path, monkeypatch, capsys):
    import stylelora.plots

    def broken(*a, **k):
        raise ValueError("torn last row")

    monkeypatch.setattr(stylelora.plots, "plot_loss", broken)
    out = train(_cfg(tiny_base, style_folder, tmp_path / "a.safetensors", steps=2))
    assert load_adapter(out).layers
    assert "warning: no loss plot (ValueError: torn last row)" in capsys.readouterr().out


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_caching_is_exact(tiny_base, style_folder, tmp_path, monkeypatch, train_text_encoder):
    """Cached latents (and, with the text encoder frozen, cached text embeddings, including the
    empty caption of dropout) give the adapter an uncached run gives -- and the caches are used."""
    import stylelora.base

    calls = []
    real_load = stylelora.base.load_base

    def counting_load(*a, **k):
        pipe = real_load(*a, **k)
        for name, mod in (("vae", pipe.vae.encoder), ("text_encoder", pipe.text_encoder)):
            mod.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
        return pipe

    monkeypatch.setattr(stylelora.base, "load_base", counting_load)
    runs = {}
    for cache in (True, False):
        calls.clear()
        out = train(_cfg(tiny_base, style_folder, tmp_path / f"c{cache}.safetensors", cache=cache,
                         caption_dropout=0.3, train_text_encoder=train_text_encoder))
        runs[cache] = (_weights(out), calls.count("vae"), calls.count("text_encoder"))
    (cached, vae_c, te_c), (plain, vae_p, te_p) = runs[True], runs[False]
    assert cached.keys() == plain.keys()
    # Equal up to float rounding: the VAE encodes the images in other batches when caching, which
    # changes the last bits of a latent; over 12 steps of attn-ff LoRA that reached 1.006e-6 once.
    for k in cached:
        torch.testing.assert_close(cached[k], plain[k], rtol=0, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert vae_c < vae_p, "latents were not cached"
    assert (te_c < te_p) != train_text_encoder, "text embeddings cached iff the text encoder is frozen"


def test_adapters_of_different_data_start_from_different_down_projections(tiny_base, style_folder, tmp_path):
    """LoRA's A matrices barely move in training, so their seed fixes which input directions an adapter
    reads. Seeded by the data too: two styles trained with the same settings read different directions
    (one shared seed made every stacked pair double its shared part; docs/stacking.md). Same data and
    seed: the same adapter."""
    other = tmp_path / "other"
    shutil.copytree(style_folder, other)
    (other / "000.txt").write_text((other / "000.txt").read_text() + ", bold")
    runs = {name: load_adapter(train(_cfg(tiny_base, folder, tmp_path / f"{name}.safetensors", steps=2)))
            for name, folder in (("a", style_folder), ("again", style_folder), ("b", other))}
    a, again, b = (runs[n].layers for n in ("a", "again", "b"))
    assert all(torch.equal(a[k].down, again[k].down) for k in a)
    cosines = [torch.nn.functional.cosine_similarity(a[k].down.flatten(), b[k].down.flatten(), dim=0).abs()
               for k in a]
    assert max(cosines) < 0.5, max(cosines)
