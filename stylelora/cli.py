"""`stylelora` command line. Thin: parse, call the library, print. Heavy imports happen inside
the subcommands so `stylelora --help` stays instant."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .config import (DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_SEED, MODE_HELP, MODES, TrainConfig, add_config_flags,
                     check_generation, load_toml)

# The most images one `generate --sweep` makes (adapters x strengths): each costs a full generation.
MAX_SWEEP_IMAGES = 64
from .fileio import atomic_path


class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback."""


def _add_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None,
                   help="base model: 'embedded' (default), 'embedded-xl' (its SDXL twin), a diffusers folder, "
                        "or a .safetensors checkpoint")
    p.add_argument("--base-config", default=None,
                   help="local diffusers folder with the configs of a single-file --base")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu)")


def _load(args):
    from .base import load_base

    return load_base(args.base, config=args.base_config, device=args.device)


def cmd_world_render(args) -> None:
    from .world.render import TRAIN_COMBOS, parse_style, render_batch, styled_caption

    palette, technique = parse_style(args.style)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (scene, img) in enumerate(render_batch(args.n, args.seed, palette, technique, args.size,
                                                       combos=TRAIN_COMBOS), 1):
        img.save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(styled_caption(scene, palette, technique) + "\n")
    # Content from the pretraining combinations only: held-out combinations stay unseen for `eval`.
    print(f"wrote {args.n} images with captions to {out}")


def cmd_world_styles(args) -> None:
    from .world.render import PALETTES, TECHNIQUES

    styles = {"palette": list(PALETTES[1:]), "technique": list(TECHNIQUES[1:])}
    if args.json:
        print(json.dumps(styles))
    else:
        for family, names in styles.items():
            print(f"{family}: {', '.join(names)}")


def cmd_world_judge_check(args) -> None:
    from .world.judge import check

    acc = check(n_per_style=args.n, seed=args.seed)
    print(json.dumps(acc) if args.json else "\n".join(f"{k}: {v:.3f}" for k, v in acc.items()))


def cmd_world_pretrain(args) -> None:
    from .world.pretrain import PretrainConfig, pretrain

    stages = tuple(s.strip() for s in args.stages.split(","))
    known = ("judge", "vae", "vae-refine", "unet", "unet-xl")
    if unknown := [s for s in stages if s not in known]:
        raise UserError(f"unknown --stages {', '.join(unknown)}: choose from {', '.join(known)}")
    pretrain(args.out, PretrainConfig(seed=args.seed), stages=stages)


def cmd_eval(args) -> None:
    from .adapters import load_adapter
    from .blend import AdapterStack
    from .evaluate import evaluate

    if args.n < 1:
        raise UserError(f"--n must be >= 1 (the number of prompts to judge), got {args.n}")
    check_generation(steps=args.steps, guidance=args.guidance, seed=args.seed, prefix="--")
    if args.seed + args.n - 1 > MAX_SEED:  # image i uses seed + i
        raise UserError(f"--seed {args.seed} + --n {args.n} passes 2**63-1: image i uses seed + i; "
                        "use a smaller --seed")
    adapters = [(load_adapter(path), scale) for path, scale in _scaled_specs(args.adapter, args.raw_scale)]  # before the base
    pipe = _load(args)
    stack = AdapterStack(pipe)
    triggers: list[str] = []
    for i, (adapter, scale) in enumerate(adapters):
        stack.add(f"adapter{i}", adapter, scale)
        triggers += [t for t in adapter.trigger_words if t not in triggers]
    # Prompts carry the adapters' trigger words, as a user of a style adapter would write them.
    result = evaluate(pipe, n=args.n, seed=args.seed, triggers=triggers, stack=stack, mode=args.mode,
                      intensity=args.intensity, steps=args.steps, guidance=args.guidance)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


def cmd_export_base(args) -> None:
    from .base import save_single_file

    path = save_single_file(_load(args), args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); load it with --base {path} "
          f"--base-config <a diffusers folder of the same architecture>")


# --- adapters: inspect, convert, merge, generate ------------------------------------------------

def cmd_inspect(args) -> None:
    import collections
    import re

    from .adapters import describe, load_adapter

    info = describe(load_adapter(args.file))
    info["file_bytes"] = Path(info["path"]).stat().st_size
    if args.json:
        try:  # strict JSON: NaN / Infinity are not JSON, and other tools' parsers reject them
            text = json.dumps(info, allow_nan=False)
        except ValueError as e:
            raise UserError(f"{args.file}: cannot print as JSON ({e}): run inspect without --json") from None
        print(text)
        return
    # Targets grouped by their repeated part (attn2.to_q x7) so SD-sized adapters stay readable.
    groups = collections.Counter(re.sub(r"^([^.]+)\..*\.(transformer_blocks|layers)\.\d+\.", r"\1 ", key)
                                 for key in info["targets"])
    summary = lambda d: ", ".join(f"{k}={json.dumps(v)}" for k, v in d.items()) or "-"  # noqa: E731
    print(f"file:           {info['path']} ({info['file_bytes']:,} bytes)\n"
          f"format:         {info['format']} (version {info['format_version'] or '-'})\n"
          f"rank / alpha:   {info['rank']} / {info['alpha']:g}\n"
          f"targets:        {info['n_targets']} layers: "
          + ", ".join(f"{k} x{n}" for k, n in groups.items()) + "\n"
          f"base:           {info['base_name'] or '-'} (fingerprint {info['base_fingerprint'] or '-'})\n"
          f"trigger words:  {', '.join(info['trigger_words']) or '-'}\n"
          f"strength:       {_strength_line(info['strength_map'])}\n"
          f"training:       {summary(info['training'])}\n"
          f"dataset:        {summary(info['dataset'])}\n"
          f"size:           {info['n_params']:,} parameters, {info['nbytes'] / 1e6:.2f} MB of tensors")


def _strength_line(points) -> str:
    """How stylelora's strengths map to the raw LoRA weight other tools use."""
    if not points:
        return "strength = raw LoRA weight (no calibration)"
    from .strength import to_raw

    return ("calibrated: strength " + ", ".join(f"{s:g} = raw {to_raw(points, s):.2f}" for s in (0.25, 0.5, 0.75))
            + " (other tools use the raw weight; 0 and 1 are the same in both)")


def cmd_convert(args) -> None:
    from .adapters import load_adapter, save_adapter

    adapter = load_adapter(args.input)
    path = save_adapter(adapter, args.out, layout=args.to)
    print(f"wrote {path}: {len(adapter.layers)} layers, {adapter.source_format} -> {args.to} keys")


def _scaled_specs(specs: list[str], raw: bool = False):
    """--adapter PATH[:SCALE[:TE_SCALE]] values -> [(path, Scale)]; raw: the numbers are raw LoRA
    scales, not strengths (--raw-scale)."""
    from .blend import Scale
    from .parsing import parse_adapter_spec

    out = []
    for spec in specs:
        path, scale, te = parse_adapter_spec(spec)
        out.append((Path(path), Scale(scale, scale if te is None else te, raw=raw)))
    return out


def _add_raw_scale(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw-scale", action="store_true",
                   help="scales are raw LoRA weights (what other tools use), not calibrated strengths")


def cmd_merge(args) -> None:
    from .adapters import load_adapter, needs_base, save_adapter
    from .blend import merge_adapters

    items = [(load_adapter(path), scale) for path, scale in _scaled_specs(args.adapters, args.raw_scale)]
    # DoRA and some LoHa/LoKr layers are exact only against the base: load it only then (or when named)
    need = args.base or any(needs_base(layer) for ad, _ in items for layer in ad.layers.values())
    merged, rel = merge_adapters(items, rank=args.rank, base=_load(args) if need else None)
    path = save_adapter(merged, args.out)
    print(f"wrote {path}: {len(items)} adapters merged at rank {merged.rank} "
          f"({len(merged.layers)} layers), relative error {rel:.3g}")


def _size(text: str | None) -> tuple[int, int] | None:
    import re

    if text is None:
        return None
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if not m or int(m[1]) % 8 or int(m[2]) % 8 or not int(m[1]) or not int(m[2]):
        raise ValueError(f"bad --size {text!r}: give WIDTHxHEIGHT in multiples of 8, e.g. 64x64")
    return int(m[1]), int(m[2])


def _strengths(text: str) -> list[float]:
    from .parsing import parse_number_list

    try:
        strengths = parse_number_list(text)
    except ValueError:
        strengths = []
    if not strengths or not all(math.isfinite(s) for s in strengths):
        raise ValueError(f"bad --sweep {text!r}: give comma-separated strengths, e.g. 0,0.5,1")
    return strengths


def cmd_generate(args) -> None:
    from .adapters import load_adapter
    from .blend import AdapterStack, Scale, parse_prompt_loras

    check_generation(steps=args.steps, guidance=args.guidance, seed=args.seed, prefix="--")
    prompt, tagged = parse_prompt_loras(args.prompt, args.adapters_dir)
    specs = (_scaled_specs(args.adapter, args.raw_scale)
             + [(path, Scale(w["unet"], w["text_encoder"], raw=args.raw_scale)) for path, w in tagged])
    size, strengths = _size(args.size), _strengths(args.sweep) if args.sweep else None
    if strengths and len(specs) * len(strengths) > MAX_SWEEP_IMAGES:
        raise UserError(f"--sweep of {len(specs)} adapter(s) x {len(strengths)} strength(s) is "
                        f"{len(specs) * len(strengths)} images, over the cap of {MAX_SWEEP_IMAGES}: "
                        "sweep fewer strengths or adapters per run")
    out = Path(args.out)
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {out}: unknown image type {out.suffix or '(no suffix)'!r}; use .png, .jpg or .webp")
    if strengths and not specs:
        raise UserError("--sweep varies adapter strengths: add --adapter PATH or a <lora:NAME> tag")
    adapters = [(path, load_adapter(path), scale) for path, scale in specs]  # bad files fail before the base loads
    stack = AdapterStack(_load(args))
    for path, adapter, scale in adapters:
        name = path.stem
        while name in stack.names:  # the same file twice: both count, as two entries
            name += "+"
        stack.add(name, adapter, scale)
    gen = dict(negative=args.negative, seed=args.seed, steps=args.steps, guidance=args.guidance, size=size,
               mode=args.mode, switch_every=args.switch_every)
    if strengths:
        from .grid import image_grid

        image = image_grid(_sweep(stack, prompt, strengths, gen), row_labels=stack.names,
                           col_labels=[f"{s:g}" for s in strengths])
    else:
        image = stack.generate(prompt, **gen)
    with atomic_path(out) as tmp:
        image.save(tmp)
    print(f"wrote {out}" + (f" ({len(stack.names)} adapters x {len(strengths)} strengths)" if strengths else ""))


def _sweep(stack, prompt: str, strengths: list[float], gen: dict) -> list[list]:
    """stack.sweep's rows, one image per call, with a progress line per image on stderr."""
    import time

    total, t0, rows = len(stack.names) * len(strengths), time.perf_counter(), []
    for name in stack.names:
        rows.append([])
        for s in strengths:
            rows[-1].append(stack.sweep(prompt, [s], names=[name], **gen)[0][0])
            done = sum(map(len, rows))
            print(f"sweep: image {done}/{total} ({name} at {s:g}), {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    return rows


def cmd_train(args) -> None:
    from .train import train

    values = load_toml(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    values.update(given)
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:  # a TOML value of the wrong kind
        raise UserError(f"bad training config: {e}") from None
    if not cfg.dataset:
        raise UserError("no dataset: give DATASET_DIR (or `dataset = ...` in the TOML file)")
    train(cfg)


def cmd_ui(args) -> None:
    root = Path(__file__).resolve().parents[1]
    if (root / "ui" / "app.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))  # ui/ sits beside the package in a source checkout (installed: a package)
    try:
        from ui.app import serve
    except ModuleNotFoundError as e:
        raise UserError(f"the web UI needs the ui package (installed with stylelora, or ui/ of a checkout) "
                        f"and gradio ({e})") from None
    serve(args.adapters, args.base, host=args.host, port=args.port, auth=args.auth,
          datasets_dir=args.datasets, base_config=args.base_config, device=args.device, enabled=args.on)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylelora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_world(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_adapter_tools(sub)
    _add_generate(sub)
    _add_ui(sub)
    return parser


def _add_world(sub) -> None:
    world = sub.add_parser("world", help="the embedded shapes world: render data, styles, judge, pretrain")
    wsub = world.add_subparsers(dest="world_command", required=True)
    p = wsub.add_parser("render", help="write PNG + caption pairs in a style")
    p.add_argument("--style", required=True, help="flat, a palette, a technique, or PALETTE+TECHNIQUE")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(func=cmd_world_render)
    p = wsub.add_parser("styles", help="list the style names")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_world_styles)
    p = wsub.add_parser("judge-check", help="judge accuracy per head on fresh renders")
    p.add_argument("--n", type=int, default=40, help="images per palette x technique pair")
    p.add_argument("--seed", type=int, default=10_000_000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_world_judge_check)
    p = wsub.add_parser("pretrain", help="rebuild the embedded base and judge from scratch")
    p.add_argument("--out", default=str(Path(__file__).parent / "world" / "assets"))
    p.add_argument("--stages", default="judge,vae,unet,unet-xl")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_world_pretrain)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA style adapter on a folder of captioned images",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("dataset", nargs="?", help="folder of images with same-stem captions")
    p.add_argument("--config", default=None, help="TOML file with TrainConfig fields (flags override it)")
    add_config_flags(p, TrainConfig, skip=("dataset",))
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="judge a base (+ adapters) on held-out prompts")
    _add_base(p)
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE[:TE_SCALE]]",
                   help="blend an adapter in (repeatable); its trigger words are added to the prompts")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--mode", default=MODES[0], choices=MODES, help=MODE_HELP)
    _add_raw_scale(p)
    p.add_argument("--intensity", action="store_true",
                   help="also report each style's intensity (0 = like strength 0, 1 = like strength 1; "
                        "generates every prompt twice more)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export-base", help="write a base as one original-layout .safetensors checkpoint")
    _add_base(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_base)


def _add_adapter_tools(sub) -> None:
    p = sub.add_parser("inspect", help="show an adapter file's rank, alpha, targets, base, trigger words, size")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="rewrite an adapter with kohya keys (the default layout, which "
                       "diffusers, ComfyUI, A1111 and sd-scripts load) or diffusers/PEFT keys")
    p.add_argument("input")
    p.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="merge scaled adapters into one (truncated SVD of the summed deltas)")
    p.add_argument("adapters", nargs="+", metavar="PATH[:SCALE[:TE_SCALE]]")
    p.add_argument("--rank", type=int, default=None, help="rank of the result (default: sum of ranks, exact)")
    _add_raw_scale(p)
    _add_base(p)  # read only for DoRA / LyCORIS layers that need it, or when given
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=cmd_merge)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate an image with a base and stacked adapters")
    p.add_argument("prompt", help="the prompt; A1111 <lora:NAME:SCALE> tags load ADAPTERS_DIR/NAME.safetensors")
    p.add_argument("--negative", default=None)
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE[:TE_SCALE]]")
    p.add_argument("--adapters-dir", default="adapters", help="where <lora:NAME> tags look (default: ./adapters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--size", default=None, metavar="WxH", help="default: the base's native size")
    p.add_argument("--mode", default=MODES[0], choices=MODES, help=MODE_HELP)
    _add_raw_scale(p)
    p.add_argument("--switch-every", type=int, default=1, help="switch mode: steps per adapter")
    p.add_argument("--sweep", default=None, metavar="S1,S2,...",
                   help="write an adapters x strengths grid instead of one image")
    _add_base(p)
    p.add_argument("-o", "--out", required=True, help="output image (.png)")
    p.set_defaults(func=cmd_generate)


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="web UI: generate with per-adapter sliders, train, manage adapters")
    p.add_argument("--adapters", default="adapters", help="adapter folder (default: ./adapters)")
    p.add_argument("--datasets", default="datasets", help="the Train tab's dataset folders (default: ./datasets)")
    _add_base(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--on", action="append", default=[], metavar="NAME",
                   help="adapter ticked on (strength 1) when the page opens (repeatable)")
    p.add_argument("--auth", default=os.environ.get("STYLELORA_UI_AUTH"), metavar="USER:PASS",
                   help="require this login (or set STYLELORA_UI_AUTH, which keeps it out of `ps`)")
    p.set_defaults(func=cmd_ui)


def process_defaults() -> None:
    """Environment of a stylelora process (CLI, demo), set before torch or transformers load.
    Each is only a default: a value the user exported wins."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # transformers warns on every pipeline load that torchvision is missing (it is not needed here)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torch's CPU allocator then asks Linux for transparent huge pages on large blocks. A SD-size
    # UNet allocates GBs of short-lived conv buffers per call, each page-faulted in 4 kB pieces
    # without it: measured here, generation 4.8 -> 3.2 s and training steps +18% (README, bench/
    # train.py), same numbers bit for bit. Read once, when torch loads; ignored off Linux.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # OpenMP threads that finish their share of an op spin 100k times (GNU's default: 300k) before
    # they sleep. A training beside a generating stylelora process ran 5x slower with the default,
    # 2.2x with this; OMP_WAIT_POLICY=PASSIVE fixes that too but halves a lone training's speed
    # (bench/contention.py, README "Training beside generation"). Read when torch loads libgomp.
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")


def main(argv: list[str] | None = None) -> int:
    process_defaults()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, ValueError, OSError) as e:
        # User mistakes (and a full disk, a read-only folder) reach here with a message that names
        # the file or value and the fix; a traceback would bury it.
        print(f"stylelora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
