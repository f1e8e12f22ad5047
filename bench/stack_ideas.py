"""Stacking ideas that were measured and not adopted (docs/stacking.md, "What did not work").

Each idea combines two adapters A and B of one folder at scales (sa, sb) on held-out prompts and is
scored by the judge (both styles seen, each style, shape, colour). Most act on the noise
predictions: per denoising step, the UNet is run under "branches" -- "0" (the base), A alone,
B alone, "m" (A and B fused, i.e. merge) -- unconditionally (u) and/or with the prompt (c), and a
formula makes the step's guided prediction from them (gd(X) = u_X + G (c_X - u_X)):

  merge        gd(m)                                   composite   (gd(A) + gd(B)) / 2
  sum6         gd(A) + gd(B) - gd(0)  (Composable Diffusion, Liu et al. 2022: base + each adapter's difference)
  u0_c_ab      u_0 + G/2 ((c_A - u_0) + (c_B - u_0))   u_m_sumc    u_m + G ((c_A + c_B) / 2 - u_m)
  dcL          gd(0) + L ((c_A - c_0) + (c_B - c_0))   (each adapter's conditional change, L = 1, 2, 3, 5)
  mlateF       gd(0) for the first F of the steps, then gd(m)        mearlyF   gd(m), then gd(0) for the last F
  dc5lateF     gd(0) first, then dc5                    u0cm        u_0 + G (c_m - u_0)
  umc0         gd(m) + (c_0 - c_m)                      dualS_C     u_m + S (c_m - u_m) + C (c_0 - u_0)
  xsep/xte0/xavg  merged UNet; text embeddings e_A + e_B - e_0 / the base's / (e_A + e_B) / 2
  klora        per layer only the adapter with the larger top-64 |dW| sum (K-LoRA without its schedule)
  ortho        B's up-projection made orthogonal to A's per layer, then merge
  inj_F_W      merge, with the UNet's self-attention maps taken from the base branch for the first F
               of the steps (weight W): layout from the base, appearance from the stack

    python bench/stack_ideas.py --folder runs/styles/targets-cross-attn --pairs pastel+dots \
        --ideas merge,sum6,dc5 --n 32 [--scales 1,1] [--guidance 5]

Adapters: any folder holding PALETTE.safetensors and TECHNIQUE.safetensors (bench/styles.py writes
them). This is a research script: it reaches into AdapterStack's internals (_plan, _apply).
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stylelora.evaluate import heldout_scenes, score

G = float(os.environ.get("G", 5.0))  # --guidance sets it before anything runs


def encode(stack, pipe, plan, prompts):
    stack._apply(plan, prefix="text_encoder.")
    pos, neg = pipe.encode_prompt(prompts, "cpu", 1, True, [""] * len(prompts))
    return pos, neg


def run(stack, pipe, prompts, seeds, branches, combine, steps=20):
    """branches: name -> plan. combine(eps: dict[(branch, 'u'|'c')] -> tensor, t_index) -> guided eps."""
    embeds = {b: encode(stack, pipe, p, prompts) for b, p in branches.items() if not b.startswith("x")}
    if "xsep" in branches:  # merged UNet, embeddings composed: e_a + e_b - e_0
        A, B = [k for k in branches if k not in ("0", "m", "k", "o") and not k.startswith("x")][:2]
        embeds["xsep"] = tuple(embeds[A][i] + embeds[B][i] - embeds["0"][i] for i in range(2))
        embeds["xte0"] = embeds["0"]
        embeds["xavg"] = tuple((embeds[A][i] + embeds[B][i]) / 2 for i in range(2))
    unet = pipe.unet
    forward = unet.forward
    step = [0]

    def hooked(sample, timestep, encoder_hidden_states=None, *args, **kw):
        kw["return_dict"] = False
        n = sample.shape[0] // 2
        x = sample[n:]
        eps = {}
        need = combine.need(step[0]) if callable(combine.need) else combine.need
        for b in dict.fromkeys(b for b, _ in need):
            stack._apply(branches[b], prefix="unet.")
            pos, neg = embeds[b]
            kinds = [k for bb, k in need if bb == b]
            if len(kinds) == 2:
                out = forward(torch.cat([x, x]), timestep, torch.cat([neg, pos]), *args, **kw)[0]
                eps[(b, "u")], eps[(b, "c")] = out.chunk(2)
            else:
                out = forward(x, timestep, pos if kinds[0] == "c" else neg, *args, **kw)[0]
                eps[(b, kinds[0])] = out
        g = combine(eps, step[0])
        step[0] += 1
        return (torch.cat([g, g]),)

    unet.forward = hooked
    try:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        pos, neg = embeds[next(iter(branches))]
        out = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, generator=gens, num_inference_steps=steps,
                   guidance_scale=G, width=64, height=64)
        # guidance_scale>1 -> pipeline chunks and re-guides: u + G(c-u) with u=c=g gives g
        return out.images
    finally:
        del unet.forward
        stack._apply({})


def F(need, fn):
    fn.need = need
    return fn


def formulas(names):
    a, b = names
    gd = lambda e, x: e[(x, "u")] + G * (e[(x, "c")] - e[(x, "u")])
    fs = {}
    fs["merge"] = F([("m", "u"), ("m", "c")], lambda e, t: gd(e, "m"))
    fs["composite"] = F([(a, "u"), (a, "c"), (b, "u"), (b, "c")], lambda e, t: (gd(e, a) + gd(e, b)) / 2)
    # Composable-diffusion style: base guided + each adapter's guided difference
    fs["sum6"] = F([("0", "u"), ("0", "c"), (a, "u"), (a, "c"), (b, "u"), (b, "c")],
                   lambda e, t: gd(e, a) + gd(e, b) - gd(e, "0"))
    fs["u_m_sumc"] = F([("m", "u"), (a, "c"), (b, "c")],
                       lambda e, t: e[("m", "u")] + G * ((e[(a, "c")] + e[(b, "c")]) / 2 - e[("m", "u")]))
    fs["u0_c_ab"] = F([("0", "u"), (a, "c"), (b, "c")],
                      lambda e, t: e[("0", "u")] + G / 2 * ((e[(a, "c")] - e[("0", "u")]) + (e[(b, "c")] - e[("0", "u")])))
    # each adapter's cond-space difference from base cond, added to base guided, unguided
    for lam in (1, 2, 3, 5):
        fs[f"dc{lam}"] = F([("0", "u"), ("0", "c"), (a, "c"), (b, "c")],
                           lambda e, t, lam=lam: gd(e, "0") + lam * ((e[(a, "c")] - e[("0", "c")]) + (e[(b, "c")] - e[("0", "c")])))
    for f in (0.1, 0.2, 0.3, 0.5):
        k = int(f * 20)
        fs[f"mlate{f}"] = F(lambda t, k=k: [("0", "u"), ("0", "c")] if t < k else [("m", "u"), ("m", "c")],
                            lambda e, t, k=k: gd(e, "0") if t < k else gd(e, "m"))
        fs[f"dc5late{f}"] = F(lambda t, k=k: [("0", "u"), ("0", "c")] + ([] if t < k else [(a, "c"), (b, "c")]),
                              lambda e, t, k=k: gd(e, "0") if t < k else gd(e, "0") + G * ((e[(a, "c")] - e[("0", "c")]) + (e[(b, "c")] - e[("0", "c")])))
        fs[f"mearly{f}"] = F(lambda t, k=k: [("m", "u"), ("m", "c")] if t < 20 - k else [("0", "u"), ("0", "c")],
                             lambda e, t, k=k: gd(e, "m") if t < 20 - k else gd(e, "0"))
    fs["u0cm"] = F([("0", "u"), ("m", "c")], lambda e, t: e[("0", "u")] + G * (e[("m", "c")] - e[("0", "u")]))
    fs["umc0"] = F([("m", "u"), ("m", "c"), ("0", "c")], lambda e, t: gd(e, "m") + 1.0 * (e[("0", "c")] - e[("m", "c")]))
    for x in ("xsep", "xte0", "xavg"):
        fs[x] = F([(x, "u"), (x, "c")], lambda e, t, x=x: gd(e, x))
    for gs in (1.5, 2, 3):
        for gc in (1, 2, 3, 4):
            fs[f"dual{gs}_{gc}"] = F([("m", "u"), ("m", "c"), ("0", "u"), ("0", "c")],
                                     lambda e, t, gs=gs, gc=gc: e[("m", "u")] + gs * (e[("m", "c")] - e[("m", "u")])
                                     + gc * (e[("0", "c")] - e[("0", "u")]))
    fs["klora"] = F([("k", "u"), ("k", "c")], lambda e, t: gd(e, "k"))
    fs["ortho"] = F([("o", "u"), ("o", "c")], lambda e, t: gd(e, "o"))
    return fs


def main():
    global G
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", required=True, help="folder with the adapters (NAME.safetensors)")
    ap.add_argument("--pairs", default="pastel+dots")
    ap.add_argument("--ideas", "--formulas", dest="formulas", default="merge,sum6")
    ap.add_argument("--guidance", type=float, default=None, help="default 5, or $G")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--scales", default="1,1")
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    G = args.guidance if args.guidance is not None else G
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    scenes = heldout_scenes(args.n)
    sa, sb = map(float, args.scales.split(","))
    for pair in args.pairs.split(","):
        pa, pb = pair.split("+")
        stack = AdapterStack(pipe)
        stack.add(pa, Path(args.folder) / f"{pa}.safetensors", 0.0)
        stack.add(pb, Path(args.folder) / f"{pb}.safetensors", 0.0)
        branches = {"0": {}, pa: stack._plan({pa: stack._parse({pa: sa})[pa]}),
                    pb: stack._plan({pb: stack._parse({pb: sb})[pb]}),
                    "m": stack._plan(stack._parse({pa: sa, pb: sb}))}
        # K-LoRA (static): per layer only the adapter with the larger top-k |dW| sum
        from stylelora.adapters import Adapter, LoraFactors, load_adapter
        A, B = stack._loaded[pa].adapter, stack._loaded[pb].adapter
        def topk(lay, k):
            d = lay.delta().abs().flatten()
            return float(d.topk(min(k, d.numel())).values.sum())
        kplan = {}
        for key, terms in branches["m"].items():
            if len(terms) == 1:
                kplan[key] = terms
                continue
            sc = {n: topk(stack._loaded[n].adapter.layers[key], 64) for n, _ in terms}
            best = max(terms, key=lambda t: sc[t[0]] * abs(t[1]))
            kplan[key] = (best,)
        branches["k"] = kplan
        # orthogonal: b's up projected off a's up columns per layer
        lay = {}
        for key, lb in B.layers.items():
            if key in A.layers:
                q, _ = torch.linalg.qr(A.layers[key].up.flatten(1).float())
                up = lb.up.flatten(1) - q @ (q.T @ lb.up.flatten(1))
                lay[key] = LoraFactors(lb.down, up.reshape(lb.up.shape).contiguous(), lb.alpha)
            else:
                lay[key] = lb
        stack.add("b_orth", Adapter(lay, dict(B.metadata)), 0.0)
        branches["o"] = stack._plan(stack._parse({pa: sa, "b_orth": sb}))
        branches["xsep"] = branches["m"]
        branches["xte0"] = branches["m"]
        branches["xavg"] = branches["m"]
        fs = formulas((pa, pb))
        prompts = [f"{s.caption()}, {pa}, {pb}" for s in scenes]
        for name in args.formulas.split(","):
            t0 = time.time()
            if name.startswith("inj"):
                _, frac, w = name.split("_")
                imgs = run_inject(stack, pipe, prompts, list(range(args.n)), branches, float(frac), float(w))
            else:
                imgs = run(stack, pipe, prompts, list(range(args.n)), branches, fs[name])
            r = score(imgs, scenes, per_image=True)
            both = sum(p == pa and q == pb for p, q in zip(r["per_image"]["palette"], r["per_image"]["technique"])) / args.n
            row = dict(pair=pair, f=name, scales=args.scales, both=both, pal=r["palette"][pa], tech=r["technique"][pb],
                       shape=r["shape_acc"], color=r["color_acc"], s=round(time.time() - t0, 1))
            print(json.dumps(row), flush=True)
            if args.save:
                from stylelora.grid import image_grid
                image_grid([imgs[:8]], [name], [str(i) for i in range(8)], scale=2).save(f"{args.save}_{pair}_{name}.png")
        stack.reset()



class SelfAttnShare:
    """attn1 processor: records attention probabilities (base branch) or replaces them (stack branch)."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        st = self.store
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(hidden_states))
        probs = attn.get_attention_scores(q, k, None)
        if st["mode"] == "record":
            st["maps"].append(probs)
        elif st["mode"] == "inject":
            probs = st["maps"][st["i"]] * st["w"] + probs * (1 - st["w"])
            st["i"] += 1
        h = attn.batch_to_head_dim(torch.bmm(probs, v))
        h = attn.to_out[1](attn.to_out[0](h))
        if attn.residual_connection:
            h = h + hidden_states
        return h / attn.rescale_output_factor


def run_inject(stack, pipe, prompts, seeds, branches, frac, w=1.0, steps=20, stack_branch="m"):
    from diffusers.models.attention_processor import AttnProcessor
    embeds = {b: encode(stack, pipe, branches[b], prompts) for b in ("0", stack_branch)}
    unet = pipe.unet
    st = {"mode": "off", "maps": [], "i": 0, "w": w}
    procs = {n: (SelfAttnShare(st) if n.endswith("attn1.processor") else AttnProcessor()) for n in unet.attn_processors}
    old = unet.attn_processors
    unet.set_attn_processor(procs)
    forward = unet.forward
    step = [0]

    def hooked(sample, timestep, encoder_hidden_states=None, *args, **kw):
        kw["return_dict"] = False
        inject = step[0] < frac * steps
        out = {}
        for b in (("0", stack_branch) if inject else (stack_branch,)):
            stack._apply(branches[b], prefix="unet.")
            pos, neg = embeds[b]
            st["mode"] = ("record" if b == "0" else "inject") if inject else "off"
            if b == "0":
                st["maps"], st["i"] = [], 0
            out[b] = forward(sample, timestep, torch.cat([neg, pos]), *args, **kw)[0]
        step[0] += 1
        return (out[stack_branch],)

    unet.forward = hooked
    try:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        pos, neg = embeds[stack_branch]
        return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, generator=gens, num_inference_steps=steps,
                    guidance_scale=G, width=64, height=64).images
    finally:
        del unet.forward
        unet.set_attn_processor(old)
        stack._apply({})


if __name__ == "__main__":
    main()
