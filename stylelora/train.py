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
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .checkpoints import checkpoints_in, find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_toml  # noqa: F401 - TrainConfig and load_toml are used from here
from .data import RUN_MARKER, split_tags
from .fileio import atomic_path, file_identity, publish_beside, remove_folder, set_mode_for, temp_beside, write_text


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


def _latent_mask(mask: torch.Tensor, latent_hw) -> torch.Tensor:
    """A pixel mask (1, H, W) at the latent grid's size, each latent pixel the mean of the pixels it
    covers (bucket sides are multiples of the VAE factor, so exactly its block), as kohya does."""
    return F.interpolate(mask[None], size=tuple(latent_hw), mode="area")[0]  # (1, h, w)


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per sample (B,). With masks (n, 1, h, w) for the first n samples, each
    latent pixel's error is weighted by its mask value and divided by the element count, not by
    the mask's sum, as kohya does: a pixel's weight then never depends on the rest of its mask (a
    mask with 1% white would otherwise train those pixels 100x as hard), an all-white mask is the
    plain loss bit for bit, and learning rates carry over. The samples past n (prior preservation's
    neutral half, whose target is the base's prediction, valid everywhere) weigh every pixel fully."""
    err = F.mse_loss(pred, target, reduction="none")  # (B, C, h, w)
    if masks is not None:
        full = masks.new_ones((len(err) - len(masks), *masks.shape[1:]))
        err = err * torch.cat([masks, full])  # (B, 1, h, w) broadcasts over the channels
    return err.mean(dim=(1, 2, 3))


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
    from tqdm.auto import tqdm

    run = _Run(cfg)  # paths checked; accelerator, base, data, LoRA and optimizer set up
    start = run.resume()  # a checkpoint's state, and a run folder holding this run's states only
    run.prepare()  # accelerate's wrappers, the noise schedule, caches, batches, trigger words
    run.open_loss_log(start)
    main = run.accel.is_main_process
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and main),
               desc="train", unit="step", dynamic_ncols=True)
    t0, recent = time.time(), []
    done = start
    for step in range(start, cfg.steps):
        if should_stop is not None and should_stop():
            if main:
                print(f"stopped at step {done} of {cfg.steps}")
            break
        for g in run.optimizer.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(cfg, step)
        for micro in range(cfg.grad_accum):
            recent.append(run.micro_step(step * cfg.grad_accum + micro))
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean = run.log_loss(done, recent)
            recent = []
            if main:
                sps = (done - start) / (time.time() - t0)
                bar.set_postfix(loss=f"{mean:.4f}", sps=f"{sps:.1f}")
                if on_log is not None:
                    on_log({"step": done, "steps": cfg.steps, "loss": mean,
                            "lr": run.optimizer.param_groups[0]["lr"], "steps_per_s": sps})
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            run.checkpoint(done)
        if main and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
            sample_path = run.sample_grid(done)
            if on_log is not None:
                on_log({"step": done, "steps": cfg.steps, "sample": str(sample_path)})
    bar.close()
    return run.write_adapter(done, t0)


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # precision or device: a notebook, the UI or a benchmark calling train() again must still work.
    # Reset that per-run state only; the process / distributed state (PartialState) stays.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    accel = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                        cpu=cfg.device == "cpu")
    if cfg.device not in ("auto", "cpu") and accel.device.type != cfg.device:
        raise ValueError(f"device {cfg.device!r} asked for, but accelerate found none and picked "
                         f"{accel.device.type}: use --device auto or cpu (choose GPUs with "
                         "CUDA_VISIBLE_DEVICES or accelerate launch)")
    return accel


def _check_outputs(cfg: TrainConfig) -> None:
    """Refuse, before any work, outputs that would fail at the end or poison the dataset: `out` a
    folder, and a run folder inside the dataset that discovery would read (the default run folder,
    OUT without .safetensors + .run, and hidden folders are skipped there)."""
    out, run = Path(cfg.out), cfg.run_path
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file path ending in .safetensors "
                         f"(e.g. {out / 'style.safetensors'})")
    if run.exists() and not run.is_dir():
        raise ValueError(f"the run folder {run} is a file: move it, or pass --run-dir FOLDER")
    data, inside = Path(cfg.dataset).resolve(), run.resolve()
    if inside != data and data in inside.parents:
        parts = inside.relative_to(data).parts
        if not any(p.endswith(".run") or p.startswith(".") for p in parts):
            raise ValueError(f"the run folder {run} is inside the dataset {cfg.dataset}: the next training "
                             "would train on its loss plot and sample grids. Name it NAME.run "
                             "(--run-dir NAME.run) or put it outside the dataset")


def _clean_run_folder(run: Path, ckpt: Path | None, start: int) -> None:
    """The run folder holds this run's states only, so a later `--resume RUN` continues this run:
    a new run removes every checkpoint there; a resume removes those it does not continue (later
    steps of an abandoned branch, or all of them when resuming from another folder)."""
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


@contextmanager
def _lora_off(models, off: bool = True):
    """The models' LoRA layers off inside the block (the frozen base), when `off`."""
    models = models if isinstance(models, (list, tuple)) else [models]
    for model in models if off else ():
        model.disable_adapters()
    try:
        yield
    finally:
        for model in models if off else ():
            model.enable_adapters()


class _Text(NamedTuple):
    """A batch's text conditioning: the UNet's cross-attention input and, on SDXL, text_encoder_2's
    pooled embedding (None on SD 1.x/2.x)."""

    hidden: torch.Tensor  # (B, tokens, dim); SDXL: both encoders' penultimate layers, concatenated
    pooled: torch.Tensor | None = None  # (B, dim2)

    def rows(self) -> list[_Text]:
        pooled = [None] * len(self.hidden) if self.pooled is None else list(self.pooled)
        return [_Text(h, p) for h, p in zip(self.hidden, pooled)]

    @staticmethod
    def stack(rows: list[_Text]) -> _Text:
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return _Text(torch.stack([r.hidden for r in rows]), pooled)

    def cat(self, other: _Text) -> _Text:
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return _Text(torch.cat([self.hidden, other.hidden]), pooled)


class _Run:
    """One training run: the pieces train()'s loop calls, in the order it calls them. Every random
    draw of a micro-batch (batch order, noise, timesteps, LoRA dropout) comes from seeds of (seed,
    micro-batch, process), in the same order each time, so a resumed run replays them exactly."""

    def __init__(self, cfg: TrainConfig):
        from .adapters import fingerprint
        from .base import load_base
        from .data import discover

        # Wrong paths fail here, before the base loads (a minute, for a full-size SD).
        if not cfg.dataset:
            raise ValueError("no dataset: set TrainConfig.dataset to a folder of images with same-stem captions")
        if not Path(cfg.dataset).is_dir():
            discover(cfg.dataset, cfg.caption_ext)  # raises, naming the path and the fix
        if cfg.mask_dir is not None and not Path(cfg.mask_dir).is_dir():
            raise FileNotFoundError(f"mask folder {cfg.mask_dir} does not exist: check --mask-dir")
        _check_outputs(cfg)
        # What is at `out` now: the user's earlier adapter, replaced at the end as usual. A file that
        # appears there (or changes) while this run trains is someone else's and is kept.
        self.out_before = file_identity(cfg.out)
        self.cfg, self.run_dir = cfg, cfg.run_path
        self.ckpt = find_checkpoint(cfg.resume) if cfg.resume else None
        self.accel = _accelerator(cfg)
        self.dev = self.accel.device
        # Frozen weights in the mixed-precision dtype, the LoRA weights in float32 (as the diffusers
        # examples do): the optimizer and fp16's gradient scaler need float32 parameters. The base is
        # read straight into that dtype (not float32 first, then cast, as the examples do): peak memory
        # is then the half-size copy. The fingerprint hashes at float16 precision, so under fp16 it is
        # the released base's; under bf16 it is the bf16 copy's (the weights trained against).
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        self.pipe = load_base(cfg.base, config=cfg.base_config, device=str(self.dev), dtype=self.weight_dtype)
        self.base_fingerprint = fingerprint(self.pipe)
        self.unet, self.te, self.vae, self.tok = (self.pipe.unet, self.pipe.text_encoder, self.pipe.vae,
                                                  self.pipe.tokenizer)
        # SDXL's second text encoder (OpenCLIP bigG's role) and its tokenizer; None on SD 1.x/2.x.
        self.te2, self.tok2 = getattr(self.pipe, "text_encoder_2", None), getattr(self.pipe, "tokenizer_2", None)
        for m in (self.unet, self.te, self.te2, self.vae):
            if m is not None:
                m.requires_grad_(False)
        self.data = self._dataset()
        self.optimizer = self._add_lora()
        # What a resume must match beyond the settings: checkpoints record it.
        self.identity = {"processes": self.accel.num_processes, "base_fingerprint": self.base_fingerprint,
                         "dataset_fingerprint": self.data.fingerprint()}
        self.scaler = getattr(self.accel, "scaler", None)  # fp16's GradScaler; None otherwise

    def _dataset(self):
        from .base import native_size
        from .data import CaptionFolder, CaptionProcessor

        cfg = self.cfg
        data = CaptionFolder(cfg.dataset, resolution=cfg.resolution or native_size(self.pipe),
                             caption_ext=cfg.caption_ext,
                             captions=CaptionProcessor(cfg.trigger, cfg.shuffle_captions, cfg.keep_tokens,
                                                       cfg.caption_dropout),
                             bucket=cfg.bucket, bucket_step=self.pipe.vae_scale_factor,
                             random_crop=cfg.random_crop, flip=cfg.flip, seed=cfg.seed,
                             masks=cfg.masked_loss, mask_dir=cfg.mask_dir)
        if self.accel.is_main_process:
            print("\n".join([data.report, *data.long_captions(self.tok)]))
        return data

    def _add_lora(self):
        """LoRA on the chosen targets (float32), the trainable parameters by name, the optimizer."""
        from .lora import inject, text_encoder_targets, unet_targets

        cfg, unet = self.cfg, self.unet
        encoders = {"text_encoder": self.te} | ({"text_encoder_2": self.te2} if self.te2 is not None else {})
        # The A (down) matrices barely move in training, so they fix which input directions an adapter
        # reads. Seeded by the data as well as the seed: adapters trained on different data read different
        # directions, and their sum no longer doubles a shared part (one seed for every adapter broke
        # stacked pictures: docs/stacking.md). The images and captions only: masks on or off, the same
        # start (an all-white mask trains exactly as no mask). Every process derives the same seed.
        torch.manual_seed(_seed_for(cfg.seed, "lora-init", self.data.fingerprint(masks=False)))
        u_targets = unet_targets(unet, cfg.targets)
        params = {"unet": inject(unet, u_targets, cfg.rank, cfg.effective_alpha, cfg.lora_dropout)}
        self.t_targets = []  # every text encoder's targets (SDXL: both encoders' q/k/v/out)
        for comp, te in encoders.items() if cfg.train_text_encoder else ():
            targets = text_encoder_targets(te)
            params[comp] = inject(te, targets, cfg.rank, cfg.effective_alpha, cfg.lora_dropout)
            self.t_targets += [f"{comp}.{t}" for t in targets]
        for p in (p for group in params.values() for p in group):
            p.data = p.data.float()
        self.named = {f"{comp}.{n}": p for comp, model in {"unet": unet, **encoders}.items()
                      for n, p in model.named_parameters() if p.requires_grad}
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        te_lr = cfg.te_lr if cfg.te_lr is not None else cfg.lr / 2
        groups = [{"params": params["unet"], "lr": cfg.lr, "base_lr": cfg.lr}]
        te_params = [p for comp in encoders for p in params.get(comp, [])]
        if te_params:
            groups.append({"params": te_params, "lr": te_lr, "base_lr": te_lr})
        return _make_optimizer(cfg, groups)

    def resume(self) -> int:
        """Load the checkpoint being resumed (if any); clean the run folder. Returns the first step."""
        start = 0
        if self.ckpt is not None:
            start = load_checkpoint(self.ckpt, self.named, self.optimizer, self.cfg, scaler=self.scaler,
                                    identity=self.identity)
        if self.accel.is_main_process:
            _clean_run_folder(self.run_dir, self.ckpt, start)
        self.accel.wait_for_everyone()
        return start

    def prepare(self) -> None:
        from diffusers import DDPMScheduler

        from .data import BucketBatchSampler, split_tags

        cfg, accel, data = self.cfg, self.accel, self.data
        # Caches: exact only when nothing random touches pixels / captions / the text encoder.
        self.cache_latents = cfg.cache and data.deterministic_pixels
        self.cache_text = cfg.cache and data.cacheable_captions and not self.t_targets
        self.latent_cache: dict[int, torch.Tensor] = {}
        self.mask_cache: dict[int, torch.Tensor] = {}  # masked loss: latent-sized masks, cached with the latents
        self.text_cache: dict[str, torch.Tensor] = {}
        # Models in train mode only for LoRA dropout; base layers have no dropout/batchnorm to disturb.
        self.unet, self.te, self.optimizer = accel.prepare(self.unet, self.te, self.optimizer)
        if self.te2 is not None:
            self.te2 = accel.prepare(self.te2)
        self._train_mode()
        self.noise_sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.v_pred = self.noise_sched.config.prediction_type == "v_prediction"
        self.alphas_cumprod = self.noise_sched.alphas_cumprod.to(self.dev)
        # Prior preservation: the trigger words (given, or the tags every caption shares) are removed
        # from each caption; the adapter must then reproduce the base (all LoRA layers off).
        self.triggers = split_tags(cfg.trigger or "") or data.guess_triggers()
        if cfg.preserve_weight and not self.triggers:
            raise ValueError(f"preserve_weight needs trigger words to remove, and the captions in {cfg.dataset} "
                             "share none: pass --trigger WORD")
        self.raw_unet, self.raw_te = accel.unwrap_model(self.unet), accel.unwrap_model(self.te)
        self.raw_tes = [self.raw_te] + ([accel.unwrap_model(self.te2)] if self.te2 is not None else [])
        # The frozen base text encoder's embeddings never change: one cache serves the run (the same
        # dict as text_cache when the text encoder is not trained, so no caption is encoded twice).
        self.base_text_cache = self.text_cache if not self.t_targets else {}
        self.cache_base_text = cfg.cache and data.cacheable_captions  # else every caption would stay in memory
        self.sampler = BucketBatchSampler(data, cfg.batch_size, seed=cfg.seed)
        self.epochs: dict[int, list[list[int]]] = {}
        self.per_epoch = max(1, len(self.sampler.batches(0)) // accel.num_processes)
        self.prompts = cfg.sample_prompts or [data.caption_for_sampling(i) for i in range(min(4, data.n_images))]

    def _train_mode(self) -> None:
        self.unet.train()
        for te in (self.te, self.te2):
            if te is not None:
                te.train(bool(self.t_targets))

    # --- batches and caches

    def _batch_indices(self, micro: int) -> list[int]:
        """Micro-batch `micro` of this process: epoch order is a pure function of (seed, epoch)."""
        epoch, k = divmod(micro, self.per_epoch)
        if epoch not in self.epochs:
            self.epochs.clear()
            self.epochs[epoch] = self.sampler.batches(epoch)
        self.data.set_epoch(epoch)  # new crops, flips and caption shuffles each epoch
        batches = self.epochs[epoch]
        return batches[(k * self.accel.num_processes + self.accel.process_index) % len(batches)]

    def _batch(self, micro: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor | None]:
        """Latents, captions, SDXL micro-conditioning (add_time_ids, (B, 6)) and (masked loss)
        latent-sized masks (B, 1, h, w) of micro-batch `micro`."""
        data, batch, masked = self.data, self._batch_indices(micro), self.cfg.masked_loss
        if self.cache_latents:  # keyed by image: repeats share one latent, and cached images are not decoded
            items = [data.sample(i, pixels=data.item_of(i) not in self.latent_cache) for i in batch]
            missing = {it["item"]: it for it in items if "pixel_values" in it}
            if missing:
                lat = self._encode_images(torch.stack([it["pixel_values"] for it in missing.values()]))
                self.latent_cache.update({k: l.cpu() for k, l in zip(missing, lat)})
                if masked:  # as deterministic as the pixels: cached beside their latents
                    self.mask_cache.update({k: _latent_mask(it["mask"], lat.shape[-2:]) for k, it in missing.items()})
            latents = torch.stack([self.latent_cache[it["item"]] for it in items]).to(self.dev)
            masks = [self.mask_cache[it["item"]] for it in items] if masked else None
        else:
            items = [data.sample(i) for i in batch]
            latents = self._encode_images(torch.stack([it["pixel_values"] for it in items]))
            masks = [_latent_mask(it["mask"], latents.shape[-2:]) for it in items] if masked else None
        time_ids = torch.tensor([it["time_ids"] for it in items], dtype=torch.float32, device=self.dev)
        masks = None if masks is None else torch.stack(masks).to(self.dev)
        return latents, [it["caption"] for it in items], time_ids, masks

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # The posterior mean: deterministic, so caching it is exact.
        vae = self.vae
        return vae.encode(pixels.to(self.dev, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor

    def _ids(self, tok, captions: list[str]) -> torch.Tensor:
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.dev)

    def _encode_text(self, captions: list[str], grad: bool) -> _Text:
        """What the pipeline feeds its UNet: SD 1.x/2.x the last layer of its one encoder; SDXL both
        encoders' penultimate layers concatenated, plus text_encoder_2's pooled projection."""
        with torch.set_grad_enabled(grad), self.accel.autocast():
            if self.te2 is None:
                return _Text(self.te(self._ids(self.tok, captions))[0])
            out2 = self.te2(self._ids(self.tok2, captions), output_hidden_states=True)
            hidden = self.te(self._ids(self.tok, captions), output_hidden_states=True).hidden_states[-2]
            return _Text(torch.cat([hidden, out2.hidden_states[-2]], -1), out2.text_embeds)

    @torch.no_grad()
    def _cached_text(self, captions: list[str], cache: dict[str, _Text], base: bool = False) -> _Text:
        new = [c for c in dict.fromkeys(captions) if c not in cache]
        if new:
            with _lora_off(self.raw_tes, base and bool(self.t_targets)):
                cache.update(zip(new, self._encode_text(new, grad=False).rows()))
        return _Text.stack([cache[c] for c in captions])

    def _predict(self, unet, noisy: torch.Tensor, t: torch.Tensor, cond: _Text, time_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction in float32; SDXL's UNet also takes the pooled text and add_time_ids."""
        dtype = self.weight_dtype
        added = None if cond.pooled is None else {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return unet(noisy.to(dtype), t, cond.hidden.to(dtype), added_cond_kwargs=added).sample.float()

    def _text(self, captions: list[str]) -> _Text:
        if self.cache_text:
            return self._cached_text(captions, self.text_cache)
        return self._encode_text(captions, grad=bool(self.t_targets))

    # --- the loss

    def micro_step(self, micro: int) -> float:
        """Forward, loss and backward of one micro-batch (the optimizer steps when the accumulation
        is complete). Returns the loss."""
        cfg, accel = self.cfg, self.accel
        # One seed per (run, step, micro-batch, process): resume replays the same draws.
        torch.manual_seed(_seed_for(cfg.seed, micro, accel.process_index))
        gen = torch.Generator().manual_seed(_seed_for(cfg.seed, micro, accel.process_index, "noise"))
        latents, captions, time_ids, masks = self._batch(micro)
        strength = self._strength(micro)
        self._set_lora_strength(strength)
        try:
            graded_te = strength < 1 and self.t_targets  # a text encoder at this strength: not the cached one
            cond = self._encode_text(captions, grad=True) if graded_te else self._text(captions)
        finally:
            self._set_lora_strength(1.0)  # the UNet's LoRA is set again around its forward below
        noisy, t, target = self._noised(latents, gen)
        if strength < 1:
            target = strength * target + (1 - strength) * self._base_prediction(captions, noisy, t, time_ids)
        n = len(captions)
        if cfg.preserve_weight:
            noisy, t, cond, target, time_ids = self._with_preservation(captions, noisy, t, cond, target, time_ids)
        with accel.accumulate(self.unet), accel.autocast():
            self._set_lora_strength(strength)
            try:
                pred = self._predict(self.unet, noisy, t, cond, time_ids)
            finally:
                self._set_lora_strength(1.0)
            loss = _per_sample_mse(pred, target.float(), masks)
            if cfg.min_snr_gamma:
                loss = loss * _snr_weights(self.alphas_cumprod, t, cfg.min_snr_gamma, self.v_pred)
            loss = loss[:n].mean() + (cfg.preserve_weight * loss[n:].mean() if cfg.preserve_weight else 0)
            accel.backward(loss)
            if accel.sync_gradients and cfg.max_grad_norm:
                accel.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                      cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _strength(self, micro: int) -> float:
        """The LoRA strength this micro-batch trains at: 1, or (graded_strength of the time) uniform in
        (0, 1). Its own generator, so the other draws are the same with grading on or off."""
        if not self.cfg.graded_strength:
            return 1.0
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, micro, self.accel.process_index, "strength"))
        u, s = torch.rand(2, generator=gen).tolist()
        return s if u < self.cfg.graded_strength else 1.0

    def _set_lora_strength(self, strength: float) -> None:
        """Every LoRA layer's scale = strength x alpha / r (PEFT's own set_scale)."""
        from peft.tuners.lora import LoraLayer

        if not self.cfg.graded_strength:
            return
        for model in (self.raw_unet, *self.raw_tes):
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale("default", strength)

    @torch.no_grad()
    def _base_prediction(self, captions: list[str], noisy: torch.Tensor, t: torch.Tensor,
                         time_ids: torch.Tensor) -> torch.Tensor:
        """The frozen base's prediction (every LoRA layer off) for these captions and noisy latents."""
        base_cond = self._cached_text(captions, self.base_text_cache if self.cache_base_text else {}, base=True)
        with _lora_off(self.raw_unet), self.accel.autocast():
            return self._predict(self.raw_unet, noisy, t, base_cond, time_ids)

    def _noised(self, latents: torch.Tensor, gen: torch.Generator):
        """Noisy latents, timesteps and the prediction target (noise, or velocity for v-prediction)."""
        noise = torch.randn(latents.shape, generator=gen).to(self.dev, latents.dtype)  # (B, 4, h, w)
        if self.cfg.noise_offset:
            noise += self.cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(self.dev)
        t = torch.randint(0, len(self.alphas_cumprod), (len(latents),), generator=gen).to(self.dev)
        noisy = self.noise_sched.add_noise(latents, noise, t)
        return noisy, t, self.noise_sched.get_velocity(latents, noise, t) if self.v_pred else noise

    def _with_preservation(self, captions, noisy, t, cond: _Text, target, time_ids):
        """One forward over [styled captions; neutral captions] on the same noisy latents: the neutral
        half's target is the frozen base's prediction."""
        plain = [", ".join(w for w in split_tags(c) if w not in self.triggers) for c in captions]
        base_cond = self._cached_text(plain, self.base_text_cache if self.cache_base_text else {}, base=True)
        with torch.no_grad(), _lora_off(self.raw_unet), self.accel.autocast():
            base_pred = self._predict(self.raw_unet, noisy, t, base_cond, time_ids)
        plain_cond = self._encode_text(plain, grad=True) if self.t_targets else base_cond
        return (torch.cat([noisy, noisy]), torch.cat([t, t]), cond.cat(plain_cond),
                torch.cat([target, base_pred]), torch.cat([time_ids, time_ids]))

    # --- the loss log, checkpoints, samples

    def open_loss_log(self, start: int) -> None:
        self.log_path = self.run_dir / "loss.csv"
        if not self.accel.is_main_process:
            return
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        # Marks the run folder as one whatever its name, so discovery skips it from the first step.
        (self.run_dir / RUN_MARKER).touch()
        if start == 0 or not self.log_path.is_file():
            self.log_path.write_text("step,loss,lr\n")
        else:  # drop rows past the checkpoint so the curve has no duplicate steps
            with self.log_path.open() as f:
                rows = list(csv.reader(f))[1:]
            write_text(self.log_path, "step,loss,lr\n" + "".join(f"{','.join(r)}\n" for r in rows
                                                               if r and r[0].isdigit() and int(r[0]) <= start))

    def log_loss(self, done: int, recent: list[float]) -> float:
        """The mean loss since the last log row, over all processes; a row of loss.csv. A non-finite
        loss stops the run (every process sees the same reduced value, so all stop)."""
        mean = self.accel.reduce(torch.tensor(sum(recent) / len(recent), device=self.dev), "mean").item()
        if not math.isfinite(mean):
            last = checkpoints_in(self.run_dir / "checkpoints")
            lr = self.cfg.lr
            raise ValueError(f"the loss is {mean} at step {done}: training diverged. Lower the learning rate "
                             f"(--lr {lr:g} now; try {lr / 4:g})" + (
                                 f"; the last checkpoint before it is {last[-1]}" if last else ""))
        if self.accel.is_main_process:
            with self.log_path.open("a") as f:
                f.write(f"{done},{mean:.6f},{self.optimizer.param_groups[0]['lr']:.3e}\n")
        return mean

    def checkpoint(self, done: int) -> None:
        self.accel.wait_for_everyone()
        if self.accel.is_main_process:
            save_checkpoint(self.run_dir, done, self.named, self.optimizer, self.cfg, scaler=self.scaler,
                            identity=self.identity)

    @torch.no_grad()
    def sample_grid(self, done: int) -> Path:
        """A grid of the sample prompts at this step (main process only), written atomically."""
        from .generate import generate_images
        from .grid import image_grid

        path = self.run_dir / "samples" / f"step-{done:06d}.png"
        pipe, accel = self.pipe, self.accel
        self._unwrap_into_pipe()
        for model in (pipe.unet, *self.raw_tes):
            model.eval()
        with accel.autocast():  # frozen weights may be half precision, the LoRA weights float32
            images = generate_images(pipe, self.prompts, list(range(len(self.prompts))))
        with atomic_path(path) as tmp:
            image_grid([images]).save(tmp)
        self._train_mode()
        return path

    def _unwrap_into_pipe(self) -> None:
        """The pipeline's models are the trained ones again (accelerate may have wrapped them)."""
        self.pipe.unet, self.pipe.text_encoder = self.accel.unwrap_model(self.unet), self.accel.unwrap_model(self.te)
        if self.te2 is not None:
            self.pipe.text_encoder_2 = self.accel.unwrap_model(self.te2)

    # --- the adapter

    def write_adapter(self, done: int, t0: float) -> Path:
        """The trained adapter to cfg.out (main process), with its metadata; then the loss plot."""
        self.accel.wait_for_everyone()
        out = Path(self.cfg.out)
        if self.accel.is_main_process:
            out = self._save_adapter(out, done, t0)
            print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB); run folder {self.run_dir}")
            self._plot_loss()
        self.accel.wait_for_everyone()
        self.accel.end_training()
        return out

    def _save_adapter(self, out: Path, done: int, t0: float) -> Path:
        from .adapters import adapter_from_pipeline, save_adapter
        from .base import base_name

        cfg, run, pipe = self.cfg, self.run_dir, self.pipe
        self._unwrap_into_pipe()
        adapter = adapter_from_pipeline(pipe, metadata={
            "stylelora.base_name": base_name(cfg.base),
            "stylelora.base_fingerprint": self.base_fingerprint,
            "stylelora.trigger_words": json.dumps(self.triggers),
            "stylelora.training": json.dumps({**cfg.summary(), "steps_done": done,
                                              "seconds": round(time.time() - t0, 1)}),
            "stylelora.dataset": json.dumps(self.data.summary()),
            **self._kohya_metadata(done, t0),
        })
        if cfg.calibrate_strength:
            from .strength import calibrate

            captions = [self.data.caption_for_sampling(i) for i in range(min(16, self.data.n_images))]
            adapter.metadata.update(calibrate(adapter, cfg.base, captions, self.triggers))
        try:
            with temp_beside(out) as tmp:
                save_adapter(adapter, tmp, output_name=out.stem)  # kohya layout: every tool loads it
                return self._publish(tmp, out)
        except OSError as e:
            last = checkpoints_in(run / "checkpoints")
            raise OSError(e.errno, f"{e.strerror or e}; the trained adapter was not written. " + (
                f"Free space, then `--resume {run}` continues from {last[-1].name}" if last else
                "There is no checkpoint to resume from: free space and train again")) from e

    def _kohya_metadata(self, done: int, t0: float) -> dict[str, str]:
        """The run as sd-scripts' train_network.py records it (`ss_*`), which A1111 and other UIs show:
        resolution, steps, learning rates, folders and tags. Names only, never a local path. The base's
        version entries come from adapter_from_pipeline, the network's from save_adapter."""
        from .base import base_name, native_size

        cfg, size = self.cfg, self.cfg.resolution or native_size(self.pipe)
        dirs, tags = self._dataset_dirs()
        entries = {
            "ss_sd_model_name": base_name(cfg.base), "ss_training_started_at": t0,
            "ss_training_finished_at": time.time(), "ss_steps": done, "ss_max_train_steps": cfg.steps,
            "ss_learning_rate": cfg.lr, "ss_unet_lr": cfg.lr,
            "ss_text_encoder_lr": (cfg.te_lr or cfg.lr / 2) if cfg.train_text_encoder else None,
            "ss_resolution": (size, size), "ss_enable_bucket": cfg.bucket, "ss_num_train_images": len(self.data),
            "ss_batch_size_per_device": cfg.batch_size, "ss_gradient_accumulation_steps": cfg.grad_accum,
            "ss_total_batch_size": cfg.batch_size * cfg.grad_accum * self.accel.num_processes,
            "ss_lr_scheduler": cfg.lr_schedule, "ss_lr_warmup_steps": cfg.warmup_steps,
            "ss_optimizer": cfg.optimizer, "ss_max_grad_norm": cfg.max_grad_norm, "ss_seed": cfg.seed,
            "ss_min_snr_gamma": cfg.min_snr_gamma, "ss_noise_offset": cfg.noise_offset,
            "ss_network_dropout": cfg.lora_dropout, "ss_mixed_precision": cfg.mixed_precision,
            "ss_caption_dropout_rate": cfg.caption_dropout, "ss_shuffle_caption": cfg.shuffle_captions,
            "ss_keep_tokens": cfg.keep_tokens, "ss_flip_aug": cfg.flip, "ss_random_crop": cfg.random_crop,
            "ss_prior_loss_weight": cfg.preserve_weight,
            "ss_dataset_dirs": json.dumps(dirs), "ss_tag_frequency": json.dumps(tags),
        }
        return {k: str(v) for k, v in entries.items()}  # sd-scripts writes str(value): "True", "None"

    def _dataset_dirs(self) -> tuple[dict, dict]:
        """ss_dataset_dirs ({folder: {"n_repeats", "img_count"}}) and ss_tag_frequency ({folder: {tag:
        times in the captions}}, tags lower-cased and counted as sd-scripts counts them), keyed by
        image folder: its path inside the dataset (kohya's `10_name`), the dataset's name at its top."""
        from pathlib import PurePosixPath

        top = self.cfg.summary()["dataset"]
        dirs: dict[str, dict[str, int]] = {}
        tags: dict[str, dict[str, int]] = {}
        for k, item in enumerate(self.data.items):
            folder = str(PurePosixPath(item.rel).parent)
            folder = top if folder == "." else folder
            entry = dirs.setdefault(folder, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
            counts = tags.setdefault(folder, {})
            for tag in split_tags(self.data.caption_for_sampling(k).lower()):  # the trigger included
                counts[tag] = counts.get(tag, 0) + 1
        return dirs, tags

    def _publish(self, tmp: Path, out: Path) -> Path:
        """The written adapter `tmp` into place: over the file that was at `out` when the run started
        (the user's earlier adapter), never over one that appeared or changed there since (an upload,
        convert, merge or other training under that name): then beside it, as OUT-2.safetensors, ..."""
        if self.out_before is not None and file_identity(out) == self.out_before:
            set_mode_for(tmp, out)
            os.replace(tmp, out)
            return out
        written = publish_beside(tmp, out)
        if written != out:
            print(f"note: {out} appeared or changed while this run trained, so it was kept; the trained "
                  f"adapter is {written} (rename it as you like)")
        return written

    def _plot_loss(self) -> None:
        from .plots import plot_loss

        try:  # after the adapter: a damaged log must not cost the trained weights
            plot_loss(self.log_path, self.run_dir / "loss.png")
        except Exception as e:  # noqa: BLE001 - the plot is a convenience
            print(f"warning: no loss plot ({type(e).__name__}: {e}); the log is {self.log_path}")
