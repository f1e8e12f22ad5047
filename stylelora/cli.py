"""`stylelora` command line. Thin: parse, call the library, print. Heavy imports happen inside
the subcommands so `stylelora --help` stays instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback."""


def _add_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None,
                   help="base model: 'embedded' (default), a diffusers folder, or a .safetensors checkpoint")
    p.add_argument("--base-config", default=None,
                   help="local diffusers folder with the configs of a single-file --base")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu)")


def _load(args):
    from .base import load_base

    return load_base(args.base, config=args.base_config, device=args.device)


def cmd_world_render(args) -> None:
    from .world.render import parse_style, render_batch, styled_caption

    palette, technique = parse_style(args.style)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (scene, img) in enumerate(render_batch(args.n, args.seed, palette, technique, args.size), 1):
        img.save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(styled_caption(scene, palette, technique) + "\n")
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

    pretrain(args.out, PretrainConfig(seed=args.seed), stages=tuple(args.stages.split(",")))


def cmd_eval(args) -> None:
    from .evaluate import diffusers_adapters, evaluate, parse_adapter_spec

    specs = [parse_adapter_spec(a)[:2] for a in args.adapter]
    pipe = _load(args)
    with diffusers_adapters(pipe, specs) as triggers:
        # Prompts carry the adapters' trigger words, as a user of a style adapter would write them.
        prefix = "".join(f"{t}, " for t in triggers)
        result = evaluate(pipe, n=args.n, seed=args.seed, prefix=prefix, steps=args.steps,
                          guidance=args.guidance)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


def cmd_export_base(args) -> None:
    from .base import save_single_file

    path = save_single_file(_load(args), args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); load it with --base {path} "
          f"--base-config <a diffusers folder of the same architecture>")


def _add_config_flags(p: argparse.ArgumentParser, config_cls, skip=()) -> None:
    """One --flag per dataclass field (type from the annotation, help from the default), with
    default SUPPRESS so only flags the user typed override the TOML file and the defaults."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default: {default})")
        elif typing.get_origin(kind) is list or base is list:
            p.add_argument(flag, action="append", default=argparse.SUPPRESS, help="repeatable")
        else:
            p.add_argument(flag, type=base, default=argparse.SUPPRESS, help=f"(default: {default})")


def cmd_train(args) -> None:
    from .train import TrainConfig, load_toml, train

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


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS

    parser = argparse.ArgumentParser(prog="stylelora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--stages", default="judge,vae,unet")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_world_pretrain)

    p = sub.add_parser("train", help="train a LoRA style adapter on a folder of captioned images",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("dataset", nargs="?", help="folder of images with same-stem captions")
    p.add_argument("--config", default=None, help="TOML file with TrainConfig fields (flags override it)")
    from .train import TrainConfig

    _add_config_flags(p, TrainConfig, skip=("dataset",))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="judge a base (+ adapters) on held-out prompts")
    _add_base(p)
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export-base", help="write a base as one original-layout .safetensors checkpoint")
    _add_base(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_base)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        # User mistakes reach here with a message that names the value and the fix.
        print(f"stylelora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
