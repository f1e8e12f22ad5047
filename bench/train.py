"""Training benchmark: stylelora's trainer against the straightforward diffusers-example step.

The peer re-implements the per-step work of diffusers' examples/text_to_image/
train_text_to_image_lora.py: every step the batch is decoded from image bytes and transformed
(resize, random crop, normalise), the captions tokenized, the VAE encodes the pixels (a posterior
sample) and the text encoder encodes the captions -- nothing is cached; PEFT LoRA (r = alpha =
rank, gaussian init) on every UNet attention to_q/to_k/to_v/to_out.0, AdamW, a constant LR
scheduler, epsilon MSE loss, accelerate prepare/accumulate/backward, the per-step loss gather and
its gradient clipping call (a no-op there too: its parameter filter was consumed by the
optimizer). stylelora runs `stylelora.train.train` with its defaults except the targets: cross-attention (the
card's injection points; the default `attn-ff` also trains self-attention and feed-forward) + text
encoder LoRA, rank 4, and one batch per step (`grad_accum=1`, as the peer; the default accumulates 3);
latents cached, text embeddings cached when the text encoder is frozen.

Settings
  tiny   the embedded 64 px shapes base, batch 8, the pastel dataset (32 images)
  sd15   SD1.5-architecture UNet + CLIP-L text encoder + SD VAE from configs, random weights,
         saved once to a temporary diffusers folder that both sides load; 256 px, batch 1
  sdxl   (issue #15; only with --sdxl or --only sdxl) SDXL base 1.0's architecture from its configs
         (sdxl_configs: 2.57B-parameter UNet, CLIP-L + bigG text encoders, SDXL VAE), random weights,
         saved the same way; 256 px, batch 1. Its peer re-implements train_text_to_image_lora_sdxl.py
         (worker_peer_sdxl), which caches nothing either and also runs both text encoders and a float32
         VAE every step.

Contenders per setting: the peer; stylelora (cross-attn + TE); stylelora with train_text_encoder=False;
on the tiny base also stylelora with the peer's own LoRA (targets=attn, frozen text encoder), which
isolates what caching buys from what the smaller default target set buys. sdxl, each row against
the example doing the same work at the same precision: stylelora (cross-attn + TE) against the example
with --train_text_encoder; stylelora UNet-only (sd-scripts' advice for SDXL) against the example as
it runs by default, in float32 and in bf16 (the example's --mixed_precision bf16, stylelora's
mixed_precision="bf16").

The stylelora contenders run with THP_MEM_ALLOC_ENABLE=1 (torch's allocator asks for transparent
huge pages), as the `stylelora` command sets it; the example runs without, as it ships, and once
more with it (like for like).

Every contender runs in its own subprocess (clean peak RSS from getrusage -- the driver never
imports torch, whose RSS a child would inherit into ru_maxrss -- same torch thread count, same
data). steps/s is 1 / the median step after warm-up, from per-step timestamps (stylelora: its
on_log hook with log_every=1), so start-up, model loading and stalls from other jobs are excluded.
The warm-up covers one epoch, so stylelora's latent cache is full when timing starts: the sd15
setting trains on 3 images for that reason (3 warm-up steps at batch 1), the sdxl one on 2 (2 warm-up
+ 3 timed steps). tiny and sd15 run two interleaved rounds and keep each contender's best; sdxl one
(--quick: one each; --rounds N for another count).
If train() fails after its last timed step (writing the adapter), the timing is kept and the row
is marked with the error. Also measured: the RSS floor (interpreter + the libraries both sides
import). Writes a markdown table to stdout and bench/results/train.md (--only sdxl: train-sdxl.md,
so the SD1.5 table stays; --quick: no file).

    python bench/train.py            # ~5 min on 2 cores
    python bench/train.py --quick    # ~1 min: fewer tiny steps; the SD1.5 layout at a fraction of the width
    python bench/train.py --only sdxl --sdxl-dir /tmp/sdxl-random   # ESTIMATE ~10-20 min on 2 idle cores
    python bench/train.py --only sdxl --quick   # ~1 min: the SDXL layout at toy width, code paths only

The SDXL estimate (not measured at full size): building the random folder (13.5 GB of float32, the UNet
in two shards) a few minutes; per contender a load of that folder plus 5 steps. By FLOP count at 256 px
(torch's FlopCounterMode on the meta device) one SDXL UNet forward is 428 GFLOP (SD1.5's: 180), the VAE
encode 273 and the two text encoders 111, so a float32 example step is ~1.9x the SD1.5 one measured here
(3.4 s at 2 threads): ~7 s, plus reading a 10 GB UNet twice per step. Peak RAM: one contender at a time,
each holding one copy of the base (the builder too): ~15 GB for the float32 ones (13.5 GB of weights), ~7-8 GB of bf16
weights for stylelora in bf16; the bf16 example loads float32 first and casts, so its peak RSS is near
the float32 one. --quick, --rounds and --sdxl-dir (build once, reuse) shorten it; --quick writes no table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_SPEED, GOAL_RSS = 1.5, 0.8
RANK = 4
EMBEDDED = ROOT / "stylelora" / "world" / "assets" / "base"


# ----------------------------------------------------------------------------- workers (subprocesses)

def _peak_rss_mb() -> tuple[float, float | None]:
    """getrusage's ru_maxrss (survives execve, so the driver stays free of torch to not leak its RSS
    into it) and /proc's VmHWM of this process's own memory map, as a cross-check; MiB."""
    import resource

    hwm = None
    try:
        hwm = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm  # Linux: KiB -> MiB


def _load_pairs(folder: Path) -> list[tuple[bytes, str]]:
    """(PNG bytes, caption) per image: the example's imagefolder keeps encoded bytes and decodes on access."""
    pairs = []
    for img in sorted(folder.glob("*.png")):
        pairs.append((img.read_bytes(), img.with_suffix(".txt").read_text().strip()))
    return pairs


def worker_peer(job: dict) -> dict:
    """The diffusers-example step, re-implemented (same work per step, written here)."""
    import io
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.utils import logging as dlogging
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    dlogging.set_verbosity_error()
    base, res, bs = job["base"], job["resolution"], job["batch"]
    precision = job.get("precision", "no")  # the example's --mixed_precision
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision=precision)
    set_seed(0)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    for m in (unet, vae, text_encoder):
        m.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=job["rank"], lora_alpha=job["rank"], init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    lora_layers = filter(lambda p: p.requires_grad, unet.parameters())
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    pairs = _load_pairs(Path(job["data"]))

    def transform(img: Image.Image) -> torch.Tensor:
        # Resize(shorter side -> res, bilinear), RandomCrop(res), ToTensor, Normalize([0.5], [0.5])
        w, h = img.size
        s = res / min(w, h)
        img = img.resize((max(res, round(w * s)), max(res, round(h * s))), Image.Resampling.BILINEAR)
        left, top = random.randint(0, img.width - res), random.randint(0, img.height - res)
        img = img.crop((left, top, left + res, top + res))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        return (x - 0.5) / 0.5

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(pairs)

        def __getitem__(self, i):  # the per-access transform (image decode + tokenize)
            data, caption = pairs[i]
            image = Image.open(io.BytesIO(data)).convert("RGB")
            ids = tokenizer([caption], max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids[0]
            return {"pixel_values": transform(image), "input_ids": ids}

    def collate(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}

    total = job["warmup"] + job["timed"]
    loader = torch.utils.data.DataLoader(Folder(), shuffle=True, collate_fn=collate, batch_size=bs, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500, num_training_steps=total)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)

    stamps: dict[int, float] = {}
    global_step = 0
    while global_step < total:
        unet.train()
        train_loss = 0.0
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(bs)).mean()
                train_loss += avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)  # as in the example: an exhausted filter
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                train_loss = 0.0
                stamps[global_step] = time.perf_counter()
                if global_step >= total:
                    break
    return {"stamps": stamps, "lora_params": sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)}


def worker_stylelora(job: dict) -> dict:
    from stylelora.train import TrainConfig, train

    stamps: dict[int, float] = {}

    def on_log(event: dict) -> None:
        if "steps_per_s" in event:
            stamps[event["step"]] = time.perf_counter()

    out = Path(job["tmp"]) / f"{job['name']}.safetensors"
    cfg = TrainConfig(dataset=job["data"], out=str(out), base=job["base"], resolution=job["resolution"],
                      batch_size=job["batch"], grad_accum=1, rank=job["rank"], targets=job.get("targets", "cross-attn"),
                      train_text_encoder=job["train_text_encoder"], steps=job["warmup"] + job["timed"],
                      sample_every=0, checkpoint_every=0, progress=False, log_every=1, device="cpu", seed=0,
                      mixed_precision=job.get("precision", "no"))
    try:
        train(cfg, on_log=on_log)
    except Exception as e:  # noqa: BLE001 -- after the loop (adapter save) the timing is still whole
        if cfg.steps not in stamps:
            raise
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        return {"stamps": stamps, "error": f"{type(e).__name__}: {e} (after the last step, in "
                                           f"{Path(where.filename).name}:{where.lineno} {where.name})"}
    return {"stamps": stamps}


def worker_build_sd15(job: dict) -> dict:
    """SD1.5's UNet, CLIP-L text encoder and VAE configs with random weights, saved as a diffusers folder.
    narrow=True keeps the layout (4 levels, 2 layers per block, 12 text layers) at a fraction of the width."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stylelora.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    narrow = job["narrow"]
    width, text, heads = ((32, 64, 64, 64), 64, 4) if narrow else ((320, 640, 1280, 1280), 768, 12)
    vae_width, groups = ((32, 32, 64, 64), 16) if narrow else ((128, 256, 512, 512), 32)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=width,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text, attention_head_dim=8, norm_num_groups=groups)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=vae_width,
                        layers_per_block=2, latent_channels=4, norm_num_groups=groups, sample_size=512,
                        scaling_factor=0.18215)
    tok = build_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text, intermediate_size=4 * text, num_hidden_layers=12,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=text,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae, te, tok, unet, sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(job["out"], safe_serialization=True)
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in (("unet", unet), ("text_encoder", te), ("vae", vae))}
    return {"params": n}


# SDXL base 1.0's components as its model_index lists them (unet, text_encoder = CLIP ViT-L,
# text_encoder_2 = OpenCLIP bigG with projection, vae), configs written from the published ones. narrow=True
# keeps the layout (3 levels, 2 layers per block, transformer depth 1/2/deeper, both encoders' 12 and 32
# layers, text_time conditioning) at toy widths. bench/blend.py builds its SDXL rows from these too.
def sdxl_configs(narrow: bool) -> dict[str, dict]:
    if narrow:
        width, depth, heads, groups = (32, 64, 64), (1, 2, 2), (2, 4, 4), 16
        text, text2, pooled, time_dim, te_heads = (32, 64, 32, 8, (2, 4))
        vae_width = (32, 32, 64, 64)
    else:
        width, depth, heads, groups = (320, 640, 1280), (1, 2, 10), (5, 10, 20), 32
        text, text2, pooled, time_dim, te_heads = (768, 1280, 1280, 256, (12, 20))
        vae_width = (128, 256, 512, 512)
    unet = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=width,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=depth, attention_head_dim=heads,  # diffusers' name for SDXL's head counts
                cross_attention_dim=text + text2, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled + 6 * time_dim,
                norm_num_groups=groups)
    te = dict(vocab_size=49408, hidden_size=text, intermediate_size=4 * text, num_hidden_layers=12,
              num_attention_heads=te_heads[0], max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=text)
    te2 = dict(vocab_size=49408, hidden_size=text2, intermediate_size=4 * text2, num_hidden_layers=32,
               num_attention_heads=te_heads[1], max_position_embeddings=77, hidden_act="gelu", projection_dim=pooled)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=vae_width, layers_per_block=2,
               latent_channels=4, norm_num_groups=16 if narrow else 32, sample_size=1024, scaling_factor=0.13025,
               force_upcast=True)
    return {"unet": unet, "text_encoder": te, "text_encoder_2": te2, "vae": vae}


def sdxl_models(narrow: bool, tok, dtype=None, vae: bool = True) -> dict:
    """Random-weight SDXL components (sdxl_configs), each cast to `dtype` as soon as it is built, so a
    half-precision build never holds the float32 UNet beside the text encoders. vae=False: no VAE."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = sdxl_configs(narrow)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    makers = {"unet": lambda: UNet2DConditionModel(**cfg["unet"]),
              "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **ids)),
              "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **ids))}
    if vae:
        makers["vae"] = lambda: AutoencoderKL(**cfg["vae"])
    torch.manual_seed(0)
    out = {}
    for name, make in makers.items():
        out[name] = make()
        if dtype is not None:
            out[name].to(dtype)
    return out


def sdxl_scheduler():
    """SDXL base 1.0's scheduler config (Euler; the trainers read its betas into a DDPM schedule)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                  prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)


def worker_build_sdxl(job: dict) -> dict:
    """SDXL base 1.0's architecture (sdxl_configs) with random weights, saved as a diffusers folder with
    StableDiffusionXLPipeline.save_pretrained; both tokenizers are the repo's offline CLIP tokenizer.
    Full width: ~13.9 GB of float32 (the UNet alone 10.3 GB, saved in two shards as diffusers' 10 GB
    default shard size makes it); narrow: a shard size that also splits the UNet in two, so the
    sharded load path is what --quick checks."""
    from diffusers import StableDiffusionXLPipeline

    from stylelora.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    m = sdxl_models(job["narrow"], tok)
    pipe = StableDiffusionXLPipeline(vae=m["vae"], text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"],
                                     tokenizer=tok, tokenizer_2=tok, unet=m["unet"], scheduler=sdxl_scheduler(),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    n = {k: sum(p.numel() for p in v.parameters()) for k, v in m.items()}
    shard = int(n["unet"] * 4 * 0.6) if job["narrow"] else "10GB"
    pipe.save_pretrained(job["out"], safe_serialization=True, max_shard_size=shard)
    return {"params": n}


def worker_peer_sdxl(job: dict) -> dict:
    """diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py step, re-implemented (same work
    per step, written here). Like its SD1.5 sibling it caches nothing: every step the batch is decoded
    from image bytes and transformed (Resize of the shorter side with Lanczos, its default
    --image_interpolation_mode; RandomCrop, no flip; ToTensor, Normalize), the original size and the
    crop's top-left recorded, the caption tokenized by both tokenizers; the VAE, kept in float32 at every
    precision (no --pretrained_vae_model_name_or_path), encodes a posterior sample, cast to the weight
    dtype; both text encoders encode the caption (penultimate hidden states concatenated, text_encoder_2's
    pooled projection) -- in that script no embeddings are precomputed (its full fine-tuning sibling
    train_text_to_image_sdxl.py precomputes them with a dataset .map; this one does not); add_time_ids =
    original size + crop top-left + (resolution, resolution). Frozen UNet and both text encoders in the
    weight dtype (--mixed_precision), PEFT LoRA r = alpha = rank, gaussian init, on the UNet's to_k/to_q/
    to_v/to_out.0, AdamW (1e-4, wd 1e-2), constant LR schedule, epsilon MSE (--snr_gamma unset),
    accelerate prepare/accumulate/backward, the per-step loss gather, and a gradient clip that works here
    (its parameters are a list, not a spent filter). job["train_text_encoder"] = its --train_text_encoder:
    the same LoRA on both text encoders' q/k/v/out_proj, trained with the UNet's (one optimizer, one LR)."""
    import io

    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import logging as dlogging
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dlogging.set_verbosity_error()
    base, res, bs = job["base"], job["resolution"], job["batch"]
    precision = job.get("precision", "no")
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision=precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(0)
    tokenizer_one = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    tokenizer_two = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    text_encoder_one = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    for m in (vae, text_encoder_one, text_encoder_two, unet):
        m.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32)  # "The VAE is in float32 to avoid NaN losses."
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=job["rank"], lora_alpha=job["rank"], init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    train_te = job.get("train_text_encoder", False)
    trained = [unet, text_encoder_one, text_encoder_two] if train_te else [unet]
    if train_te:
        for te in (text_encoder_one, text_encoder_two):
            te.add_adapter(LoraConfig(r=job["rank"], lora_alpha=job["rank"], init_lora_weights="gaussian",
                                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    if precision == "fp16":
        cast_training_params(trained, dtype=torch.float32)
    params_to_optimize = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params_to_optimize, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    pairs = _load_pairs(Path(job["data"]))

    def tokenize(tokenizer, captions):
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    def preprocess(image: Image.Image):
        # torchvision Resize(res, LANCZOS): shorter side -> res, longer side truncated; RandomCrop(res)
        original_size = (image.height, image.width)
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        size = (res, int(res * long / short))
        image = image.resize(size if w <= h else size[::-1], Image.Resampling.LANCZOS)
        y1 = torch.randint(0, image.height - res + 1, size=(1,)).item()
        x1 = torch.randint(0, image.width - res + 1, size=(1,)).item()
        image = image.crop((x1, y1, x1 + res, y1 + res))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        return (x - 0.5) / 0.5, original_size, (y1, x1)

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(pairs)

        def __getitem__(self, i):  # the dataset's with_transform: decode, transform, tokenize on access
            data, caption = pairs[i]
            pixels, original_size, crop_top_left = preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
            return {"pixel_values": pixels, "original_sizes": original_size, "crop_top_lefts": crop_top_left,
                    "input_ids_one": tokenize(tokenizer_one, [caption])[0],
                    "input_ids_two": tokenize(tokenizer_two, [caption])[0]}

    def collate(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples])
        return {"pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
                "input_ids_one": torch.stack([e["input_ids_one"] for e in examples]),
                "input_ids_two": torch.stack([e["input_ids_two"] for e in examples]),
                "original_sizes": [e["original_sizes"] for e in examples],
                "crop_top_lefts": [e["crop_top_lefts"] for e in examples]}

    def encode_prompt(text_encoders, ids_list):
        embeds = []
        for text_encoder, ids in zip(text_encoders, ids_list):
            out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
            pooled = out[0]  # only text_encoder_2's (the last) is kept
            embeds.append(out[-1][-2])
        return torch.concat(embeds, dim=-1), pooled.view(pooled.shape[0], -1)

    total = job["warmup"] + job["timed"]
    loader = torch.utils.data.DataLoader(Folder(), shuffle=True, collate_fn=collate, batch_size=bs, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500, num_training_steps=total)
    if train_te:
        unet, text_encoder_one, text_encoder_two, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, text_encoder_one, text_encoder_two, optimizer, loader, lr_scheduler)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)

    stamps: dict[int, float] = {}
    global_step = 0
    while global_step < total:
        unet.train()
        if train_te:
            text_encoder_one.train()
            text_encoder_two.train()
        train_loss = 0.0
        for batch in loader:
            with accelerator.accumulate(unet):
                model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
                model_input = (model_input * vae.config.scaling_factor).to(weight_dtype)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=model_input.device).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                add_time_ids = torch.cat([
                    torch.tensor([list(s + c + (res, res))]).to(accelerator.device, dtype=weight_dtype)
                    for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])])
                prompt_embeds, pooled_prompt_embeds = encode_prompt(
                    [text_encoder_one, text_encoder_two], [batch["input_ids_one"], batch["input_ids_two"]])
                model_pred = unet(noisy_model_input, timesteps, prompt_embeds,
                                  added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled_prompt_embeds},
                                  return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(bs)).mean()
                train_loss += avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_optimize, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                train_loss = 0.0
                stamps[global_step] = time.perf_counter()
            _ = {"step_loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}  # its progress bar
            if global_step >= total:
                break
    return {"stamps": stamps, "lora_params": sum(p.numel() for m in trained for n, p in m.named_parameters() if "lora_" in n)}


def worker_floor(job: dict) -> dict:
    """The RSS floor every contender pays: the interpreter plus the libraries both sides import."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    return {"stamps": {}}


def run_worker(job: dict) -> None:
    t_start = time.perf_counter()
    if job.get("threads"):
        import torch

        torch.set_num_threads(job["threads"])
    xl = job.get("setting") == "sdxl"
    fn = {"peer": worker_peer_sdxl if xl else worker_peer, "stylelora": worker_stylelora,
          "build": worker_build_sdxl if xl else worker_build_sd15, "floor": worker_floor}[job["kind"]]
    result = fn(job)
    result["peak_rss_mb"], result["vm_hwm_mb"] = _peak_rss_mb()
    result["t_start"] = t_start
    import torch

    result["threads"] = torch.get_num_threads()
    Path(job["result"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver

def spawn(job: dict, tmp: Path, verbose: bool) -> dict:
    job = {**job, "result": str(tmp / f"{job['name']}.json"), "tmp": str(tmp)}
    t0 = time.perf_counter()
    # Huge pages for torch's allocator: on for the stylelora contenders (the `stylelora` command sets
    # it, see stylelora.cli.process_defaults), off for the example as it ships, unless a row says so.
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if job.get("thp"):
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                          capture_output=not verbose, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).splitlines()[-40:])
        raise SystemExit(f"worker {job['name']} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(Path(job["result"]).read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def summarise(result: dict, warmup: int, timed: int) -> dict:
    stamps = {int(k): v for k, v in result["stamps"].items()}
    last = warmup + timed
    missing = [s for s in (warmup, last, 1) if s not in stamps]
    if missing:
        raise SystemExit(f"no timestamp for step(s) {missing}: got steps {sorted(stamps)}")
    missing = [s for s in range(warmup, last + 1) if s not in stamps]
    if missing:
        raise SystemExit(f"no timestamp for step(s) {missing}: the workers stamp every step")
    # The median step: a stall from another job on the machine moves the mean, not the median.
    step_s = statistics.median(stamps[s + 1] - stamps[s] for s in range(warmup, last))
    return {"error": result.get("error"), "steps_per_s": 1 / step_s,
            "first_step_s": stamps[1] - result["t_start"],
            "peak_rss_mb": result["peak_rss_mb"], "vm_hwm_mb": result.get("vm_hwm_mb"),
            "threads": result["threads"]}


def dataset_folder(tmp: Path, n: int | None, render: bool) -> tuple[str, str]:
    """(folder, description): datasets/pastel if present and not `render` (else 32 images rendered with
    `stylelora world render --style pastel`), or its first n images copied to a temp folder."""
    src, desc = ROOT / "datasets" / "pastel", "datasets/pastel"
    if render or not any(src.glob("*.png")):
        src, desc = tmp / "pastel", "32 images from `stylelora world render --style pastel --n 32`"
    if not any(src.glob("*.png")):
        subprocess.run([sys.executable, "-m", "stylelora.cli", "world", "render", "--style", "pastel",
                        "--n", "32", "--out", str(src)], check=True, cwd=ROOT, capture_output=True)
    if n is None:
        return str(src), f"{desc} ({len(list(src.glob('*.png')))} images)"
    dst = tmp / f"pastel-{n}"
    dst.mkdir(exist_ok=True)
    for img in sorted(src.glob("*.png"))[:n]:
        shutil.copy(img, dst / img.name)
        shutil.copy(img.with_suffix(".txt"), dst / img.with_suffix(".txt").name)
    return str(dst), f"the first {n} images of {desc}"


def random_base(key: str, folder: Path, narrow: bool, tmp: Path, threads: int, verbose: bool) -> None:
    """The random-weight SD1.5 / SDXL diffusers folder: built once, or (--sd15-dir / --sdxl-dir reuse) checked
    to hold this architecture at this mode's width."""
    arch = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[key]
    if (folder / "model_index.json").is_file():
        held = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        width = json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"][0]
        if held != arch or width != (32 if narrow else 320):
            raise SystemExit(f"{folder} holds a {'narrow' if width == 32 else 'full-width'} {held}; this mode needs a "
                             f"{'narrow' if narrow else 'full-width'} {arch}: pass another --{key}-dir")
        return
    t0 = time.perf_counter()
    built = spawn({"kind": "build", "setting": key, "name": f"build-{key}", "out": str(folder), "narrow": narrow,
                   "threads": threads}, tmp, verbose)
    mp = {k: round(v / 1e6) for k, v in built["params"].items()}
    print(f"built the random {key.upper()} pipeline ({mp} M params) in {time.perf_counter() - t0:.0f} s "
          f"(peak RSS {built['peak_rss_mb']:.0f} MB)", file=sys.stderr)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="~1 min: fewer steps, narrow SD1.5-/SDXL-layout models; writes no results file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    ap.add_argument("--only", choices=("tiny", "sd15", "sdxl"), default=None, help="run one setting")
    ap.add_argument("--sdxl", action="store_true",
                    help="add the SDXL setting to the others (long: see the module docstring); or --only sdxl")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per setting (default: tiny and sd15 2, sdxl 1; --quick 1)")
    ap.add_argument("--sd15-dir", default=None,
                    help="reuse/keep the random SD1.5 diffusers folder here (default: a temp folder, deleted)")
    ap.add_argument("--sdxl-dir", default=None,
                    help="reuse/keep the random SDXL diffusers folder here (full width: 14 GB on disk, minutes "
                         "to build; default: a temp folder, deleted)")
    ap.add_argument("--render-data", action="store_true",
                    help="render the 32 pastel images with `stylelora world render` even if datasets/pastel exists")
    ap.add_argument("--out", default=None, help="default: bench/results/train.md, or train-sdxl.md for --only sdxl; "
                                                "--quick writes none")
    ap.add_argument("--verbose", action="store_true", help="show the workers' output")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be at least 1")
    return args


def build_settings(args, run: set[str], tmp: Path, threads: int) -> list[dict]:
    """The settings to run, each with its base (random ones are built here), data and step counts."""
    settings = []
    if "tiny" in run:
        w, n, rounds = (5, 20, 1) if args.quick else (5, 50, 2)  # warm-up >= one epoch (32 images / 8)
        settings.append({"key": "tiny", "label": "embedded base, 64 px, batch 8", "base": str(EMBEDDED),
                         "data": dataset_folder(tmp, None, args.render_data), "resolution": 64,
                         "batch": 8, "warmup": w, "timed": n, "rounds": args.rounds or rounds})
    # sd15: warm-up = one epoch of 3 images at batch 1, so the latent cache is full when timing starts.
    # sdxl: 2 images, so the 2 warm-up steps are one epoch and a full-size step (tens of seconds on
    # 2 cores) is paid 5 times per contender; one round by default.
    for key, arch, n_img, w, n, rounds in (("sd15", "SD1.5", 3, 3, 6, 2), ("sdxl", "SDXL", 2, 2, 3, 1)):
        if key not in run:
            continue
        label = f"{arch}-layout (narrow, --quick), 128 px, batch 1" if args.quick else \
            f"{arch} arch (random), 256 px, batch 1"
        folder = getattr(args, f"{key}_dir")
        folder = Path(folder) if folder else tmp / key
        random_base(key, folder, args.quick, tmp, threads, args.verbose)
        settings.append({"key": key, "label": label, "base": str(folder),
                         "data": dataset_folder(tmp, n_img, args.render_data),
                         "resolution": 128 if args.quick else 256, "batch": 1, "warmup": w, "timed": n,
                         "rounds": args.rounds or (1 if args.quick else rounds)})
    return settings


# Contenders: (label, worker job fields). "vs" names the row's peer when it is not the setting's first row.
PEER = ("diffusers-example step (peer)", {"kind": "peer"})
STYLELORA_TE = ("stylelora (cross-attn + TE LoRA)", {"kind": "stylelora", "train_text_encoder": True, "thp": True})
STYLELORA_UNET = ("stylelora, train_text_encoder=False", {"kind": "stylelora", "train_text_encoder": False, "thp": True})
# like for like: the example with the allocator setting the stylelora command makes
PEER_THP = ("diffusers-example step, THP_MEM_ALLOC_ENABLE=1", {"kind": "peer", "thp": True})
# The peer's own LoRA targets (all attention, frozen text encoder): isolates the caching. Only on the
# tiny base, where it is cheap; at SD1.5 scale the UNet pass dominates either way.
SAME_TARGETS = ("stylelora, targets=attn, train_text_encoder=False (peer's LoRA)",
                {"kind": "stylelora", "train_text_encoder": False, "targets": "attn", "thp": True})
# bf16 on both sides (frozen weights in bf16, as the example's --mixed_precision bf16): on a CPU with
# AVX512-BF16 it is the precision a user would pick for an SD-size model.
BF16 = [("diffusers-example step, --mixed_precision bf16", {"kind": "peer", "precision": "bf16"}),
        ("stylelora (cross-attn + TE LoRA), mixed_precision=bf16",
         {"kind": "stylelora", "train_text_encoder": True, "precision": "bf16", "thp": True})]
# SDXL: issue #15's rows, each against the example doing the same work at the same precision. Fewer
# rows than SD1.5: each loads a 10 GB UNet and takes minutes.
XL_PEER = "diffusers SDXL-example step (peer)"
XL_PEER_BF16 = "diffusers SDXL-example step, --mixed_precision bf16"
XL_PEER_TE = "diffusers SDXL-example step, --train_text_encoder"  # the text-encoder row's like-for-like peer
XL_BF16 = "stylelora, train_text_encoder=False, mixed_precision=bf16"  # like for like with the bf16 example
_VS_TE, _VS_BF16 = {"vs": XL_PEER_TE, "vs_label": "TE peer"}, {"vs": XL_PEER_BF16, "vs_label": "bf16 peer"}
SDXL = [(XL_PEER, {"kind": "peer"}), (XL_PEER_TE, {"kind": "peer", "train_text_encoder": True, **_VS_TE}),
        (STYLELORA_TE[0], {**STYLELORA_TE[1], **_VS_TE}),
        STYLELORA_UNET,  # UNet only: what sd-scripts advises for SDXL
        (XL_PEER_BF16, {"kind": "peer", "precision": "bf16", **_VS_BF16}),
        (XL_BF16, {"kind": "stylelora", "train_text_encoder": False, "precision": "bf16", "thp": True, **_VS_BF16})]
CONTENDERS = [PEER, STYLELORA_TE, STYLELORA_UNET, PEER_THP]
LINEUPS = {"tiny": CONTENDERS + [SAME_TARGETS], "sd15": CONTENDERS + BF16, "sdxl": SDXL}


def run_setting(s: dict, threads: int, tmp: Path, verbose: bool, errors: dict) -> dict[str, dict]:
    """Every contender of the setting in interleaved rounds (load from other jobs drifts); each one's
    best round. Errors a worker raised after its last timed step are collected in `errors`."""
    best: dict[str, dict] = {}
    for rnd in range(s["rounds"]):
        for label, extra in LINEUPS[s["key"]]:
            job = {**extra, "name": f"{s['key']}-{extra['kind']}-{rnd}-{len(best)}", "setting": s["key"],
                   "base": s["base"], "data": s["data"][0], "resolution": s["resolution"],
                   "batch": s["batch"], "rank": RANK, "warmup": s["warmup"], "timed": s["timed"], "threads": threads}
            r = summarise(spawn(job, tmp, verbose), s["warmup"], s["timed"])
            print(f"  {s['key']:5s} r{rnd + 1} {label:45s} {r['steps_per_s']:8.3f} steps/s  "
                  f"{r['peak_rss_mb']:7.0f} MB (VmHWM {r['vm_hwm_mb'] or 0:.0f})  first step at "
                  f"{r['first_step_s']:.1f} s  [{r['threads']} threads]", file=sys.stderr)
            if r["threads"] != threads:
                raise SystemExit(f"worker ran {r['threads']} threads, not {threads}")
            if r["error"]:
                print(f"        worker failed after its last step: {r['error']}", file=sys.stderr)
                who = errors.setdefault(r["error"], [])
                if f"{s['key']}: {label}" not in who:
                    who.append(f"{s['key']}: {label}")
            if label not in best or r["steps_per_s"] > best[label]["steps_per_s"]:
                best[label] = r
    return best


def setting_rows(s: dict, best: dict[str, dict]) -> list[dict]:
    """One table row per contender, with its ratios against its peer."""
    lineup, rows = LINEUPS[s["key"]], []
    for label, extra in lineup:
        r, vs = best[label], extra.get("vs", lineup[0][0])
        ref = best[vs]
        rows.append({"setting": s["label"], "contender": label, **r,
                     "speed_ratio": r["steps_per_s"] / ref["steps_per_s"],
                     "rss_ratio": r["peak_rss_mb"] / ref["peak_rss_mb"], "is_peer": label == vs,
                     "vs": extra.get("vs_label") if vs != lineup[0][0] else None,
                     "other_peer": extra["kind"] == "peer" and label != vs})
    return rows


def setting_notes(s: dict, best: dict[str, dict]) -> list[str]:
    """The notes under the table: what the base weighs, the like-for-like ratios, the step counts."""
    notes = []
    if s["key"] in ("sd15", "sdxl"):
        sizes: dict[str, float] = {}
        for f in Path(s["base"]).rglob("*.safetensors"):  # a sharded component counts all its shards
            sizes[f.parent.name] = sizes.get(f.parent.name, 0) + f.stat().st_size / 2**20
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]))
        notes.append(f"{s['label']}: the base's float32 weights are {sum(sizes.values()):.0f} MB ({parts}), "
                     "loaded by every contender: with the RSS floor they bound any float32 trainer's peak "
                     "RSS from below.")

    def ratio(a: dict, b: dict) -> str:
        return (f"{a['steps_per_s'] / b['steps_per_s']:.2f}× steps/s, "
                f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}× peak RSS")

    if PEER_THP[0] in best:
        notes.append(f"{s['label']}: against the example also run with THP_MEM_ALLOC_ENABLE=1, stylelora's "
                     f"cross-attn + TE = {ratio(best[STYLELORA_TE[0]], best[PEER_THP[0]])}.")
    if s["key"] == "sd15":  # like for like: stylelora bf16 against the example in bf16
        notes.append(f"{s['label']}: with bf16 on both sides (the example without THP), stylelora / example = "
                     f"{ratio(best[BF16[1][0]], best[BF16[0][0]])}.")
    if s["key"] == "sdxl":  # the bf16 row's ratios are against the bf16 example; here against float32
        notes.append(f"{s['label']}: ratios of the bf16 rows are against the example in bf16 (same "
                     f"precision); stylelora bf16 / the float32 example = {ratio(best[XL_BF16], best[XL_PEER])}. "
                     "Each contender is one process holding one copy of the base; no THP row for the example "
                     "here (one full-size run each).")
    rounds = f"best of {s['rounds']} interleaved rounds" if s["rounds"] > 1 else "one round"
    notes.append(f"{s['label']}: {s['warmup']} warm-up + {s['timed']} timed steps, {rounds}; data: {s['data'][1]}")
    return notes


def clean_up(tmp: Path, kept: set[Path]) -> None:
    """Delete the temporary folder, except the random bases the user asked to keep (--sd15-dir, --sdxl-dir)."""
    if not kept:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    for p in tmp.iterdir():
        if p.resolve() not in kept:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    if not any(tmp.iterdir()):
        tmp.rmdir()


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    run = {args.only} if args.only else {"tiny", "sd15"} | ({"sdxl"} if args.sdxl else set())
    # The driver never imports torch: a child's ru_maxrss starts from its parent's RSS at fork.
    threads = args.threads or int(subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True, text=True, check=True).stdout)
    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows, notes, errors = [], [], {}
    try:
        settings = build_settings(args, run, tmp, threads)
        floor = spawn({"kind": "floor", "name": "floor", "threads": threads}, tmp, args.verbose)["peak_rss_mb"]
        notes.append(f"RSS floor: the interpreter + torch, diffusers, transformers, peft, accelerate imported = "
                     f"{floor:.0f} MB, paid by every contender.")
        for s in settings:
            best = run_setting(s, threads, tmp, args.verbose, errors)
            rows += setting_rows(s, best)
            notes += setting_notes(s, best)
    finally:
        clean_up(tmp, {Path(d).resolve() for d in (args.sd15_dir, args.sdxl_dir) if d})

    for err, who in errors.items():
        notes.append(f"† train() raised after its last timed step, while writing the adapter ({'; '.join(who)}): "
                     f"{err}. Steps/s and RSS come from the completed steps; no adapter was written. "
                     "A stylelora bug to fix in the trainer, not in this benchmark.")
    notes.append("Ratios are against the first row of each setting: the example step at its default precision "
                 "(float32)" + ("; in the SDXL setting, rows marked 'vs TE peer' against the example with "
                                "--train_text_encoder, 'vs bf16 peer' against the example in bf16."
                                if "sdxl" in run else "."))
    table = render(rows, notes, threads, args, time.perf_counter() - t_all)
    print(table)
    default = ROOT / "bench" / "results" / ("train-sdxl.md" if run == {"sdxl"} else "train.md")
    out = Path(args.out) if args.out else (None if args.quick else default)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    else:
        print("(--quick: no results file written; pass --out FILE to keep this table)", file=sys.stderr)


def render(rows: list[dict], notes: list[str], threads: int, args, total_s: float) -> str:
    cmd = "python bench/train.py" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only else "") + (" --sdxl" if args.sdxl else "") + \
        (f" --rounds {args.rounds}" if args.rounds else "") + (f" --threads {args.threads}" if args.threads else "")
    lines = [
        "# Training benchmark: stylelora vs the diffusers-example LoRA step",
        "",
        f"`{cmd}` — {threads} torch threads, CPU, rank {RANK}, float32 unless a row says bf16, run took {total_s:.0f} s. "
        f"Goals: steps/s ≥ {GOAL_SPEED}× the peer, peak RSS ≤ {GOAL_RSS}× the peer.",
        "",
        f"| setting | contender | steps/s | peak RSS MB | ratio vs peer (steps/s, RSS) | "
        f"goals ≥{GOAL_SPEED}× / ≤{GOAL_RSS}× | first step at s |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    for r in rows:
        if r["is_peer"]:
            ratio, goals = "1.00×, 1.00× (peer)", "—"
        else:
            ok_s, ok_m = r["speed_ratio"] >= GOAL_SPEED, r["rss_ratio"] <= GOAL_RSS
            ratio = f"{r['speed_ratio']:.2f}×, {r['rss_ratio']:.2f}×" + (f" vs {r['vs']}" if r.get("vs") else "")
            goals = "— (a peer)" if r.get("other_peer") else f"{'✓' if ok_s else '✗'} speed / {'✓' if ok_m else '✗'} RSS"
        mark = " †" if r.get("error") else ""
        lines.append(f"| {r['setting']} | {r['contender']}{mark} | {r['steps_per_s']:.3f} | {r['peak_rss_mb']:.0f} | "
                     f"{ratio} | {goals} | {r['first_step_s']:.1f} |")
    lines += ["", *[f"- {n}" for n in notes],
              "- steps/s: 1 / the median time between consecutive per-step timestamps after warm-up (model load and "
              "start-up excluded); peak RSS: getrusage ru_maxrss of the contender's own process, in MiB, "
              "whole run (imports, load, training, stylelora's adapter save). 'first step at' counts from "
              "worker start, after the interpreter started, and includes the imports, the load and step 1.",
              "- The peer trains LoRA on all attention (attn1 + attn2) and no text encoder, encoding pixels and "
              "captions every step; stylelora trains cross-attention (+ text encoder by default) with latents "
              "cached (text embeddings too when the text encoder is frozen) and min-SNR weighting and a real "
              "gradient clip.", ""]
    if any(r["setting"].startswith("SDXL") for r in rows):
        lines[-1:] = ["- SDXL peer (train_text_to_image_lora_sdxl.py): the same LoRA, and every step both text "
                      "encoders and the VAE (float32 at every precision, as the script keeps it) run again; its "
                      "gradient clip is real; with --train_text_encoder it also puts the same LoRA on both text "
                      "encoders' q/k/v/out_proj and trains them with the UNet's. See worker_peer_sdxl.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
