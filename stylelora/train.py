"""Train a LoRA style adapter on a folder of captioned images.

    cfg = TrainConfig(dataset="datasets/stripes", out="stripes.safetensors")
    train(cfg)

Design notes
- Every random draw of a step (batch order, noise, timesteps, LoRA dropout) is a pure function
  of (seed, step, process), so `resume` continues exactly: a killed-and-resumed run ends with
  the same adapter as an uninterrupted one. Checkpoints hold LoRA weights, optimizer moments and
  the step, all in safetensors/JSON (no pickle).
- Latents are cached when pixels are deterministic (no random crop/flip), text embeddings when
  the text encoder is frozen and captions are not shuffled (a dropped caption is one more
  string, ""): the VAE and text encoder then run once per
  image instead of once per step.
- Runs under `accelerate launch` (DDP over processes; bf16/fp16 via --mixed-precision).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoints import checkpoints_in, find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_toml  # noqa: F401 - TrainConfig and load_toml are used from here
from .fileio import atomic_path, remove_folder, write_text


# ----------------------------------------------------------------------------- helpers

def _seed_for(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings: independent streams per (seed, step, rank)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    progress = step / max(1, cfg.steps)
    decay = {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
    return warm * decay[cfg.lr_schedule]


def _snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, v_pred: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, over
    (SNR + 1) for v-prediction. Written so SNR = 0 (the last step of a zero-terminal-SNR schedule,
    rescale_betas_zero_snr) gives the limits 1 and 0 instead of 0 / 0 = NaN."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    w = torch.clamp(snr, max=gamma) / snr
    if v_pred:
        w = w * snr / (snr + 1)
    return torch.where(snr > 0, w, torch.zeros_like(w) if v_pred else torch.ones_like(w))


def _make_optimizer(cfg: TrainConfig, groups):
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes); "
                             "use --optimizer adamw") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig, *, on_log: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> Path:
    """Train and write the adapter to cfg.out. Returns its path.

    on_log(event) is called at every log step with {"step", "steps", "loss", "lr", "steps_per_s"}
    and after every sample grid with {"step", "steps", "sample": path}; should_stop() is polled
    once per step and ends the run early, writing the adapter as trained so far (a UI's Stop)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .adapters import adapter_from_pipeline, fingerprint, save_adapter
    from .base import base_name, load_base, native_size
    from .data import BucketBatchSampler, CaptionFolder, CaptionProcessor, discover, split_tags
    from .lora import inject, text_encoder_targets, unet_targets
    from .plots import plot_loss

    # Wrong paths fail here, before the base loads (a minute, for a full-size SD).
    if not cfg.dataset:
        raise ValueError("no dataset: set TrainConfig.dataset to a folder of images with same-stem captions")
    if not Path(cfg.dataset).is_dir():
        discover(cfg.dataset, cfg.caption_ext)  # raises, naming the path and the fix
    ckpt = find_checkpoint(cfg.resume) if cfg.resume else None

    from accelerate.state import AcceleratorState

    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # precision or device: a notebook, the UI or a benchmark calling train() again must still work.
    # Reset that per-run state only; the process / distributed state (PartialState) stays.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    accel = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                        cpu=cfg.device == "cpu")
    dev = accel.device
    if cfg.device not in ("auto", "cpu") and dev.type != cfg.device:
        raise ValueError(f"device {cfg.device!r} asked for, but accelerate found none and picked {dev.type}: "
                         "use --device auto or cpu (choose GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)")
    # Frozen weights in the mixed-precision dtype, the LoRA weights in float32 (as the diffusers
    # examples do): the optimizer and fp16's gradient scaler need float32 parameters. The base is
    # read straight into that dtype (not float32 first, then cast, as the examples do): peak memory
    # is then the half-size copy. The fingerprint hashes at float16 precision, so under fp16 it is
    # the released base's; under bf16 it is the bf16 copy's (the weights trained against).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    pipe = load_base(cfg.base, config=cfg.base_config, device=str(dev), dtype=weight_dtype)
    base_fingerprint = fingerprint(pipe)
    unet, te, vae, tok = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    for m in (unet, te, vae):
        m.requires_grad_(False)
    resolution = cfg.resolution or native_size(pipe)
    data = CaptionFolder(cfg.dataset, resolution=resolution, caption_ext=cfg.caption_ext,
                         captions=CaptionProcessor(cfg.trigger, cfg.shuffle_captions, cfg.keep_tokens,
                                                   cfg.caption_dropout),
                         bucket=cfg.bucket, bucket_step=pipe.vae_scale_factor, random_crop=cfg.random_crop,
                         flip=cfg.flip, seed=cfg.seed)
    if accel.is_main_process:
        print("\n".join([data.report, *data.long_captions(tok)]))

    # LoRA on the chosen targets; seeded so every process starts from the same A matrices.
    torch.manual_seed(cfg.seed)
    u_targets = unet_targets(unet, cfg.targets)
    params = {"unet": inject(unet, u_targets, cfg.rank, cfg.effective_alpha, cfg.lora_dropout)}
    t_targets = text_encoder_targets(te) if cfg.train_text_encoder else []
    if t_targets:
        params["text_encoder"] = inject(te, t_targets, cfg.rank, cfg.effective_alpha, cfg.lora_dropout)
    for p in (p for group in params.values() for p in group):
        p.data = p.data.float()
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    named.update({f"text_encoder.{n}": p for n, p in te.named_parameters() if p.requires_grad})
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    te_lr = cfg.te_lr if cfg.te_lr is not None else cfg.lr / 2
    groups = [{"params": params["unet"], "lr": cfg.lr, "base_lr": cfg.lr}]
    if "text_encoder" in params:
        groups.append({"params": params["text_encoder"], "lr": te_lr, "base_lr": te_lr})
    optimizer = _make_optimizer(cfg, groups)

    run = cfg.run_path
    start = 0
    # What a resume must match beyond the settings: checkpoints record it.
    identity = {"processes": accel.num_processes, "base_fingerprint": base_fingerprint,
                "dataset_fingerprint": data.fingerprint()}
    scaler = getattr(accel, "scaler", None)  # fp16's GradScaler; None otherwise
    if ckpt is not None:
        start = load_checkpoint(ckpt, named, optimizer, cfg, scaler=scaler, identity=identity)
    if accel.is_main_process:
        # The run folder holds this run's states only, so a later `--resume RUN` continues this run:
        # a new run removes every checkpoint there; a resume removes those it does not continue
        # (later steps of an abandoned branch, or all of them when resuming from another folder).
        ours = ckpt is not None and ckpt.parent.resolve() == (run / "checkpoints").resolve()
        stale = [f for f in sorted((run / "checkpoints").glob("step-*"))
                 if not (ours and f.name[5:].isdigit() and int(f.name[5:]) <= start)]
        for folder in stale:
            if folder.name[5:].isdigit():
                remove_folder(folder)
            else:  # .tmp / .deleting leftovers
                shutil.rmtree(folder, ignore_errors=True)
        for grid in (run / "samples").glob("step-*.png"):  # grids of steps this run will (re)draw
            if not grid.stem[5:].isdigit() or int(grid.stem[5:]) > start:
                grid.unlink(missing_ok=True)
        if stale:
            print(f"{'new run' if ckpt is None else 'resume'} in {run}: removed {len(stale)} checkpoint(s) "
                  f"{'of an earlier run' if ckpt is None else 'this run does not continue from'}")
        if ckpt is not None:
            print(f"resumed from {ckpt} at step {start}")
    accel.wait_for_everyone()

    # Caches: exact only when nothing random touches pixels / captions / the text encoder.
    cache_latents = cfg.cache and data.deterministic_pixels
    cache_text = cfg.cache and data.cacheable_captions and not t_targets
    latent_cache: dict[int, torch.Tensor] = {}
    text_cache: dict[str, torch.Tensor] = {}

    def encode_text(captions: list[str], grad: bool) -> torch.Tensor:
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
        with torch.set_grad_enabled(grad), accel.autocast():
            return te(ids)[0]

    @torch.no_grad()
    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        # The posterior mean: deterministic, so caching it is exact.
        return vae.encode(pixels.to(dev, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor

    # Models in train mode only for LoRA dropout; base layers have no dropout/batchnorm to disturb.
    unet, te, optimizer = accel.prepare(unet, te, optimizer)
    unet.train()
    te.train(bool(t_targets))
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    v_pred = noise_sched.config.prediction_type == "v_prediction"
    alphas_cumprod = noise_sched.alphas_cumprod.to(dev)

    # Prior preservation: the trigger words (given, or the tags every caption shares) are removed
    # from each caption; the adapter must then reproduce the base (all LoRA layers off).
    triggers = [w.strip() for w in (cfg.trigger or "").split(",") if w.strip()] or data.guess_triggers()
    if cfg.preserve_weight and not triggers:
        raise ValueError(f"preserve_weight needs trigger words to remove, and the captions in {cfg.dataset} share "
                         "none: pass --trigger WORD")
    raw_unet, raw_te = accel.unwrap_model(unet), accel.unwrap_model(te)
    # The frozen base text encoder's embeddings never change: one cache serves the run (the same
    # dict as text_cache when the text encoder is not trained, so no caption is encoded twice).
    base_text_cache = text_cache if not t_targets else {}
    cache_base_text = cfg.cache and data.cacheable_captions  # else every caption would stay in memory

    def neutral(caption: str) -> str:
        return ", ".join(t for t in split_tags(caption) if t not in triggers)

    @contextmanager
    def lora_off(model, off: bool = True):
        if off:
            model.disable_adapters()
        try:
            yield
        finally:
            if off:
                model.enable_adapters()

    @torch.no_grad()
    def cached_text(captions: list[str], cache: dict[str, torch.Tensor], base: bool = False) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in cache]
        if new:
            with lora_off(raw_te, base and bool(t_targets)):
                cache.update(zip(new, encode_text(new, grad=False)))
        return torch.stack([cache[c] for c in captions])

    @torch.no_grad()
    def base_prediction(noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with lora_off(raw_unet), accel.autocast():
            return raw_unet(noisy.to(weight_dtype), t, cond.to(weight_dtype)).sample.float()

    sampler = BucketBatchSampler(data, cfg.batch_size, seed=cfg.seed)
    epochs: dict[int, list[list[int]]] = {}
    per_epoch = max(1, len(sampler.batches(0)) // accel.num_processes)

    def batch_at(micro: int) -> list[int]:
        # Micro-batch `micro` of this process: epoch order is a pure function of (seed, epoch).
        epoch, k = divmod(micro, per_epoch)
        if epoch not in epochs:
            epochs.clear()
            epochs[epoch] = sampler.batches(epoch)
        data.set_epoch(epoch)  # new crops, flips and caption shuffles each epoch
        batches = epochs[epoch]
        return batches[(k * accel.num_processes + accel.process_index) % len(batches)]

    log_rows: list[tuple[int, float, float]] = []
    log_path = run / "loss.csv"
    if accel.is_main_process:
        (run / "samples").mkdir(parents=True, exist_ok=True)
        if start == 0 or not log_path.is_file():
            log_path.write_text("step,loss,lr\n")
        else:  # drop rows past the checkpoint so the curve has no duplicate steps
            with log_path.open() as f:
                rows = list(csv.reader(f))[1:]
            write_text(log_path, "step,loss,lr\n" + "".join(f"{','.join(r)}\n" for r in rows
                                                          if r and r[0].isdigit() and int(r[0]) <= start))
    prompts = cfg.sample_prompts or [data.caption_for_sampling(i) for i in range(min(4, data.n_images))]

    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and accel.is_main_process),
               desc="train", unit="step", dynamic_ncols=True)
    t0, recent = time.time(), []
    done = start
    for step in range(start, cfg.steps):
        if should_stop is not None and should_stop():
            if accel.is_main_process:
                print(f"stopped at step {done} of {cfg.steps}")
            break
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(cfg, step)
        for micro in range(cfg.grad_accum):
            index = step * cfg.grad_accum + micro
            # One seed per (run, step, micro-batch, process): resume replays the same draws.
            torch.manual_seed(_seed_for(cfg.seed, index, accel.process_index))
            gen = torch.Generator().manual_seed(_seed_for(cfg.seed, index, accel.process_index, "noise"))
            batch = batch_at(index)
            if cache_latents:  # keyed by image: repeats share one latent, and cached images are not decoded
                items = [data.sample(i, pixels=data.item_of(i) not in latent_cache) for i in batch]
                missing = {it["item"]: it for it in items if "pixel_values" in it}
                if missing:
                    lat = encode_images(torch.stack([it["pixel_values"] for it in missing.values()]))
                    latent_cache.update({k: l.cpu() for k, l in zip(missing, lat)})
                latents = torch.stack([latent_cache[it["item"]] for it in items]).to(dev)
            else:
                items = [data.sample(i) for i in batch]
                latents = encode_images(torch.stack([it["pixel_values"] for it in items]))
            captions = [it["caption"] for it in items]
            if cache_text:
                cond = cached_text(captions, text_cache)
            else:
                cond = encode_text(captions, grad=bool(t_targets))
            noise = torch.randn(latents.shape, generator=gen).to(dev, latents.dtype)  # (B, 4, h, w)
            if cfg.noise_offset:
                noise += cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(dev)
            t = torch.randint(0, len(alphas_cumprod), (len(items),), generator=gen).to(dev)
            noisy = noise_sched.add_noise(latents, noise, t)
            target = noise_sched.get_velocity(latents, noise, t) if v_pred else noise
            n = len(items)
            if cfg.preserve_weight:
                # One forward over [styled captions; neutral captions] on the same noisy latents.
                plain = [neutral(c) for c in captions]
                base_cond = cached_text(plain, base_text_cache if cache_base_text else {}, base=True)
                base_pred = base_prediction(noisy, t, base_cond)
                plain_cond = encode_text(plain, grad=True) if t_targets else base_cond
                noisy, t = torch.cat([noisy, noisy]), torch.cat([t, t])
                cond, target = torch.cat([cond, plain_cond]), torch.cat([target, base_pred])
            with accel.accumulate(unet), accel.autocast():
                pred = unet(noisy.to(weight_dtype), t, cond.to(weight_dtype)).sample.float()
                loss = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
                if cfg.min_snr_gamma:
                    loss = loss * _snr_weights(alphas_cumprod, t, cfg.min_snr_gamma, v_pred)
                loss = loss[:n].mean() + (cfg.preserve_weight * loss[n:].mean() if cfg.preserve_weight else 0)
                accel.backward(loss)
                if accel.sync_gradients and cfg.max_grad_norm:
                    accel.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                          cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            recent.append(loss.item())
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean = accel.reduce(torch.tensor(sum(recent) / len(recent), device=dev), "mean").item()
            recent = []
            if not math.isfinite(mean):  # every process sees the same reduced value, so all stop
                last = checkpoints_in(run / "checkpoints")
                raise ValueError(f"the loss is {mean} at step {done}: training diverged. Lower the learning rate "
                                 f"(--lr {cfg.lr:g} now; try {cfg.lr / 4:g})" + (
                                     f"; the last checkpoint before it is {last[-1]}" if last else ""))
            if accel.is_main_process:
                lr_now = optimizer.param_groups[0]["lr"]
                log_rows.append((done, mean, lr_now))
                with log_path.open("a") as f:
                    f.write(f"{done},{mean:.6f},{lr_now:.3e}\n")
                sps = (done - start) / (time.time() - t0)
                bar.set_postfix(loss=f"{mean:.4f}", sps=f"{sps:.1f}")
                if on_log is not None:
                    on_log({"step": done, "steps": cfg.steps, "loss": mean, "lr": lr_now, "steps_per_s": sps})
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            accel.wait_for_everyone()
            if accel.is_main_process:
                save_checkpoint(run, done, named, optimizer, cfg, scaler=scaler, identity=identity)
        if accel.is_main_process and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
            sample_path = run / "samples" / f"step-{done:06d}.png"
            _save_samples(pipe, accel, unet, te, prompts, sample_path)
            if on_log is not None:
                on_log({"step": done, "steps": cfg.steps, "sample": str(sample_path)})
            unet.train()
            te.train(bool(t_targets))
    bar.close()
    accel.wait_for_everyone()
    out = Path(cfg.out)
    if accel.is_main_process:
        pipe.unet, pipe.text_encoder = accel.unwrap_model(unet), accel.unwrap_model(te)
        adapter = adapter_from_pipeline(pipe, metadata={
            "stylelora.base_name": base_name(cfg.base),
            "stylelora.base_fingerprint": base_fingerprint,
            "stylelora.trigger_words": json.dumps(triggers),
            "stylelora.training": json.dumps({**cfg.summary(), "steps_done": done,
                                              "seconds": round(time.time() - t0, 1)}),
            "stylelora.dataset": json.dumps(data.summary()),
        })
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_adapter(adapter, out)
        except OSError as e:
            last = checkpoints_in(run / "checkpoints")
            raise OSError(e.errno, f"{e.strerror or e}; the trained adapter was not written. " + (
                f"Free space, then `--resume {run}` continues from {last[-1].name}" if last else
                "There is no checkpoint to resume from: free space and train again")) from e
        print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB); run folder {run}")
        try:  # after the adapter: a damaged log must not cost the trained weights
            plot_loss(log_path, run / "loss.png")
        except Exception as e:  # noqa: BLE001 - the plot is a convenience
            print(f"warning: no loss plot ({type(e).__name__}: {e}); the log is {log_path}")
    accel.wait_for_everyone()
    accel.end_training()
    return out


@torch.no_grad()
def _save_samples(pipe, accel, unet, te, prompts: list[str], path: Path) -> None:
    from .generate import generate_images
    from .grid import image_grid

    pipe.unet, pipe.text_encoder = accel.unwrap_model(unet), accel.unwrap_model(te)
    pipe.unet.eval(), pipe.text_encoder.eval()
    with accel.autocast():  # frozen weights may be half precision, the LoRA weights float32
        images = generate_images(pipe, prompts, list(range(len(prompts))))
    with atomic_path(path) as tmp:
        image_grid([images]).save(tmp)
