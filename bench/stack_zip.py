"""A learned merge in the manner of ZipLoRA (Shah et al. 2023), measured for stacking (docs/stacking.md).

For every UNet layer, one coefficient per input column for each adapter (m_A, m_B, starting at 1) is
optimised so that the merged model W0 + dA * m_A + dB * m_B reproduces each adapter alone on that
adapter's own outputs and trigger prompt (MSE of the noise predictions against the adapter's), plus
lam * |m_A . m_B| per layer (ZipLoRA's push toward columns that only one adapter uses). The text
encoders' updates are summed. The merged update is then scored on the stack prompt (both triggers),
48 prompts from the pretraining combinations (seed 500) as in bench/stack_merges.py.

    python bench/stack_zip.py --folder runs/styles/defaults      # ~1.5 min per pair on 2 cores
"""
import argparse
import time

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch.func import functional_call

from stylelora.adapters import Adapter, load_adapter
from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stylelora.evaluate import stack_images
from stylelora.lycoris import FullDiff
from stylelora.world.render import TRAIN_COMBOS, Scene
from stack_merges import report  # bench/ is on the path when run as a script


def scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [Scene(*TRAIN_COMBOS[i]) for i in rng.choice(len(TRAIN_COMBOS), n, replace=False)]


def raw(a: float, b: float) -> dict:
    """AdapterStack scales for adapters "A" and "B": raw, the same on the UNet and the text encoder."""
    return {n: {"unet": v, "text_encoder": v, "raw": True} for n, v in (("A", a), ("B", b))}


@torch.no_grad()
def teacher_set(pipe, stack: AdapterStack, own: tuple[float, float], trigger: str, seed: int, n: int):
    """Latents the adapter alone (stack scales `own`) draws for n of its trigger prompts; the prompts'
    embeddings through its own text encoder and through the merged one (both adapters at 1)."""
    prompts = [f"{s.caption()}, {trigger}" for s in scenes(seed, n)]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    stack.set_scales(raw(*own))
    latents = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="latent",
                   generator=torch.Generator().manual_seed(seed)).images
    own_emb = pipe.text_encoder(ids)[0]
    stack.set_scales(raw(1.0, 1.0))
    merged_emb = pipe.text_encoder(ids)[0]
    stack.set_scales(raw(0.0, 0.0))
    return latents, own_emb, merged_emb


def zip_merge(pipe, dA: dict, dB: dict, pal: str, tech: str, args) -> dict:
    stack = AdapterStack(pipe)
    for name, d in (("A", dA), ("B", dB)):
        stack.add(name, Adapter(layers={k: FullDiff(v) for k, v in d.items()}), raw(0.0, 0.0)[name])
    sets = [(d, *teacher_set(pipe, stack, own, trig, 900 + i, args.n_teach))
            for i, (d, own, trig) in enumerate(((dA, (1.0, 0.0), pal), (dB, (0.0, 1.0), tech)))]
    stack.reset()
    ukeys = [k for k in dA if k.startswith("unet.")]
    names = {k: k[len("unet."):] + ".weight" for k in ukeys}
    w0 = {k: pipe.unet.get_submodule(k[len("unet."):]).weight.detach() for k in ukeys}
    mA = {k: torch.ones(dA[k].shape[1], requires_grad=True) for k in ukeys}
    mB = {k: torch.ones(dB[k].shape[1], requires_grad=True) for k in ukeys}
    opt = torch.optim.Adam([*mA.values(), *mB.values()], lr=args.lr)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        loss = args.lam * sum((mA[k] * mB[k]).abs().mean() for k in ukeys) / len(ukeys)
        for d, latents, own_emb, merged_emb in sets:
            idx = torch.randint(0, len(latents), (args.batch,), generator=g)
            noise = torch.randn(latents[idx].shape, generator=g)
            t = torch.randint(0, ddpm.config.num_train_timesteps, (args.batch,), generator=g)
            xt = ddpm.add_noise(latents[idx], noise, t)
            with torch.no_grad():
                target = functional_call(pipe.unet, {names[k]: w0[k] + d[k] for k in ukeys}, (xt, t, own_emb[idx])).sample
            merged = {names[k]: w0[k] + dA[k] * mA[k] + dB[k] * mB[k] for k in ukeys}
            loss = loss + torch.nn.functional.mse_loss(functional_call(pipe.unet, merged, (xt, t, merged_emb[idx])).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: (dA[k] * mA[k] + dB[k] * mB[k]).detach() if k in mA else dA[k] + dB[k] for k in dA}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--pairs", default="pastel+dots,pastel+stripes,sepia+dots,sepia+stripes")
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps (ZipLoRA: 100)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--lam", type=float, default=0.01, help="weight of |m_A . m_B|")
    ap.add_argument("--n-teach", type=int, default=32, help="images each adapter draws for its target")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    eval_scenes = scenes(500, args.n)
    for pair in args.pairs.split(","):
        pal, tech = pair.split("+")
        dA, dB = ({k: l.delta() for k, l in load_adapter(f"{args.folder}/{s}.safetensors").layers.items()}
                  for s in (pal, tech))
        t = time.time()
        merged = zip_merge(pipe, dA, dB, pal, tech, args)
        seconds = time.time() - t
        stack = AdapterStack(pipe)
        stack.add("zip", Adapter(layers={k: FullDiff(v) for k, v in merged.items()}),
                  {"unet": 1.0, "text_encoder": 1.0, "raw": True})
        prompts = [", ".join([s.caption(), pal, tech]) for s in eval_scenes]
        images = stack_images(stack, pipe, prompts, [500 + i for i in range(args.n)], "merge")
        report(images, eval_scenes, [pal, tech], pal, tech, pair=pair, variant=f"zip{args.steps}",
               merge_s=round(seconds, 1))
        stack.reset()


if __name__ == "__main__":
    main()
