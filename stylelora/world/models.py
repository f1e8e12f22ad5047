"""Architectures of the embedded base (diffusers/transformers classes, tiny configs) and the judge.

The base is an ordinary StableDiffusionPipeline, only small: 64x64 images, an 8x VAE to
8x8x4 latents, a 2-level cross-attention UNet and a 2-layer CLIP text encoder. Nothing in
stylelora special-cases it, so code that works on it works on SD 1.x/2.x.
"""

from __future__ import annotations

import torch
from torch import nn

from .render import COLORS, PALETTES, SHAPES, TECHNIQUES

RESOLUTION = 64
TEXT_DIM = 64


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: 64 px -> 8x8 latents
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )


def make_text_encoder(vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_schedulers():
    """Training noise schedule (DDPM) and the pipeline's sampler (DPM++ 2M), same betas as SD."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1)
    return DDPMScheduler(clip_sample=False, **common), DPMSolverMultistepScheduler(**common)


class Judge(nn.Module):
    """Multi-head CNN over 64x64 renders: shape, colour, palette style, technique style."""

    HEADS = {"shape": SHAPES, "color": tuple(COLORS), "palette": PALETTES, "technique": TECHNIQUES}

    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        w = width
        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        # (B, 4w, 4, 4) -> keep coarse layout: shape needs where things are, not just what
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w * 4, len(v)) for k, v in self.HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 64, 64) in [-1, 1] -> logits per head."""
        h = self.pool(self.features(x)).flatten(1)
        return {k: head(h) for k, head in self.heads.items()}
